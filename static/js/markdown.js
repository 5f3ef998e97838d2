// A small Markdown renderer for model output. It never parses HTML and never assigns
// innerHTML: `parse` builds a plain tree whose text is only ever text, and the DOM is made
// from that tree with the elements and attributes in ALLOWED alone, so `<script>` or
// `<img onerror>` in a reply shows up as those characters. It is forgiving of half-written
// input, since a streaming reply is re-rendered as it grows (an unclosed code fence is a
// code block that is still growing).
//
// A reply is untrusted input, so rendering is linear in its length and its nesting is
// bounded: every pattern is matched without backtracking over the text, and quotes or lists
// nested deeper than MAX_DEPTH show as plain text instead of growing the stack.

/** Elements the renderer may create, with the attributes each may carry. */
export const ALLOWED = {
  p: [], h3: [], h4: [], h5: [], h6: [], hr: [], blockquote: [], ul: [], ol: ['start'], li: [],
  div: ['class'], span: [], table: [], thead: [], tbody: [], tr: [], th: ['class'], td: ['class'],
  pre: [], code: ['class'], button: ['type', 'class'], strong: [], em: [], del: [],
  a: ['href', 'target', 'rel'],
};
/** The only URL schemes a link may have; any other link stays plain text. */
export const SCHEMES = ['http:', 'https:', 'mailto:'];
/** Block nesting (quotes, list items) beyond this renders as plain text. */
export const MAX_DEPTH = 16;
// Inline spans cannot nest in themselves, so five kinds and a link bound them; this is a fence.
const MAX_INLINE = 8;
// Beyond this many columns a row gets only the cells it has, so rows × columns stays linear.
const MAX_PAD_COLUMNS = 64;

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+([\s\S]*)$/;
const BLANK = /^\s*$/;
const SPACE = /\s/;
const WORD = /\w/;
const PUNCT = /[!-/:-@[-`{-~]/;

const defaultBase = () => globalThis.location?.href ?? 'http://localhost/';

/**
 * Markdown source → tree: a list of nodes, each a string (text) or
 * `{tag, attrs?, kids?, copy?}` (`copy`: the text its Copy button copies).
 */
export function parse(src, base = defaultBase()) {
  return blockSpans(split(src), 0, base).flatMap((b) => b.tree);
}

/** Markdown source → DocumentFragment. */
export function renderMarkdown(src) {
  const frag = document.createDocumentFragment();
  for (const n of parse(src)) frag.append(build(n));
  return frag;
}

const views = new WeakMap();

/**
 * Renders `src` into `el` as renderMarkdown would, but keeps the top-level blocks that did
 * not change since the last call for `el`: while a reply streams, each frame parses and
 * builds only its growing end.
 */
export function renderMarkdownInto(el, src) {
  src = String(src);
  let prev = views.get(el);
  if (prev && (el.childNodes.length !== prev.count
      || (prev.blocks.length && el.firstChild !== prev.blocks[0].nodes[0]))) {
    prev = null; // someone else changed the element
  }
  if (!prev) {
    el.replaceChildren();
    prev = { src: '', lines: [''], blocks: [] };
  }
  const lines = split(src);
  // Appended text leaves every line but the old last one as it was: the blocks that
  // neither reach that line nor look at it stay, unparsed.
  let k = 0;
  if (src.startsWith(prev.src)) {
    const stable = prev.lines.length - 1;
    while (k < prev.blocks.length && prev.blocks[k].end + 2 <= stable) k++;
  }
  const fresh = blockSpans(lines, k ? prev.blocks[k - 1].end : 0, defaultBase());
  const old = prev.blocks.slice(k);
  let same = 0;
  while (same < old.length && same < fresh.length && old[same].key === fresh[same].key) {
    fresh[same].nodes = old[same].nodes;
    same++;
  }
  for (const b of old.slice(same)) for (const n of b.nodes) n.remove();
  for (const b of fresh.slice(same)) {
    b.nodes = b.tree.map(build);
    el.append(...b.nodes);
  }
  const blocks = prev.blocks.slice(0, k).concat(fresh);
  views.set(el, { src, lines, blocks, count: blocks.reduce((n, b) => n + b.nodes.length, 0) });
}

function split(src) {
  return String(src).replace(/\r\n?/g, '\n').split('\n');
}

/**
 * The top-level blocks from line `from` on, each with its line range and a key: its lines
 * and the lines after it that the parser looked at, so a block whose key is unchanged
 * parses the same.
 */
function blockSpans(lines, from, base) {
  const spans = [];
  blocks(lines, [], 0, base, spans, from);
  for (const b of spans) {
    // A block ends when the parser sees the line after it; two lines is a margin. A block
    // that reaches the end of the text may still change, and its key says so.
    const upTo = b.end + 2;
    b.key = (upTo > lines.length ? 'end:' : 'mid:') + lines.slice(b.start, upTo).join('\n');
  }
  return spans;
}

// ---------------------------------------------------------------------------------------
// Blocks

function startsBlock(line) {
  return FENCE.test(line) || heading(line) != null || isRule(line) || QUOTE.test(line)
    || ITEM.test(line);
}

function indentOf(line) {
  let i = 0;
  while (line.charCodeAt(i) === 32) i++;
  return i;
}

/** `## Title ##` → {level, text}, or null. Read by hand: a regex backtracks on long spaces. */
function heading(line) {
  const ind = indentOf(line);
  if (ind > 3) return null;
  let i = ind;
  while (line[i] === '#') i++;
  const level = i - ind;
  if (level < 1 || level > 6 || i >= line.length || !SPACE.test(line[i])) return null;
  let text = line.slice(i).trim();
  let j = text.length;
  while (j > 0 && text[j - 1] === '#') j--;
  if (j > 0 && j < text.length && SPACE.test(text[j - 1])) text = text.slice(0, j).trimEnd();
  return { level, text };
}

/** Three or more of the same `-`, `*` or `_`, spaces between allowed. */
function isRule(line) {
  const ind = indentOf(line);
  const ch = line[ind];
  if (ind > 3 || (ch !== '-' && ch !== '*' && ch !== '_')) return false;
  let n = 0;
  for (let i = ind; i < line.length; i++) {
    if (line[i] === ch) n++;
    else if (!SPACE.test(line[i])) return false;
  }
  return n >= 3;
}

function isTableSep(line) {
  if (!line.includes('-')) return false;
  let s = line.trim();
  if (s.startsWith('|')) s = s.slice(1);
  if (s.endsWith('|')) s = s.slice(0, -1);
  return s.split('|').every((c) => /^:?-+:?$/.test(c.trim()));
}

const plain = (lines) => ({ tag: 'p', kids: [lines.join('\n')] });

/** Appends the blocks of `lines` to `out`; at the top level also records each one's lines. */
function blocks(lines, out, depth, base, spans = null, from = 0) {
  let i = from;
  while (i < lines.length) {
    const line = lines[i];
    if (BLANK.test(line)) {
      i++;
      continue;
    }
    const start = i;
    const before = out.length;
    i = block(lines, i, out, depth, base);
    if (spans) spans.push({ start, end: i, tree: out.slice(before) });
  }
}

/** Parses the block starting at line `i` into `out`; returns the line after it. */
function block(lines, i, out, depth, base) {
  const line = lines[i];
  const fence = line.match(FENCE);
  if (fence) {
    const mark = fence[1];
    const closes = (l) => {
      const ind = indentOf(l);
      if (ind > 3) return false;
      let j = ind;
      while (l[j] === mark[0]) j++;
      return j - ind >= mark.length && BLANK.test(l.slice(j));
    };
    const code = [];
    i++;
    while (i < lines.length && !closes(lines[i])) code.push(lines[i++]);
    i++; // the closing fence, if it came yet
    out.push(codeBlock(code.join('\n'), fence[2]));
    return Math.min(i, lines.length);
  }
  const head = heading(line);
  if (head) {
    out.push({ tag: `h${Math.min(6, head.level + 2)}`, kids: inline(head.text, base) });
    return i + 1;
  }
  if (isRule(line)) {
    out.push({ tag: 'hr' });
    return i + 1;
  }
  if (QUOTE.test(line)) {
    const start = i;
    const inner = [];
    while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].replace(QUOTE, ''));
    if (depth >= MAX_DEPTH) {
      out.push(plain(lines.slice(start, i)));
    } else {
      const q = { tag: 'blockquote', kids: [] };
      blocks(inner, q.kids, depth + 1, base);
      out.push(q);
    }
    return i;
  }
  if (ITEM.test(line)) return list(lines, i, out, depth, base);
  if (line.includes('|') && i + 1 < lines.length && isTableSep(lines[i + 1])) {
    return table(lines, i, out, base);
  }
  const para = [];
  while (i < lines.length && !BLANK.test(lines[i]) && !(para.length && startsBlock(lines[i]))) {
    para.push(lines[i++]);
  }
  out.push({ tag: 'p', kids: inline(para.join('\n'), base) });
  return i;
}

function list(lines, i, out, depth, base) {
  const first = lines[i].match(ITEM);
  const ordered = /\d/.test(first[2]);
  const indent = first[1].length;
  const el = { tag: ordered ? 'ol' : 'ul', kids: [] };
  if (ordered && parseInt(first[2], 10) !== 1) el.attrs = { start: String(parseInt(first[2], 10)) };
  while (i < lines.length) {
    const m = lines[i].match(ITEM);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    const width = m[1].length + m[2].length + 1;
    const pad = ' '.repeat(width);
    i++;
    // The item goes on over indented lines (nested lists, continued text); a blank line
    // ends it unless the next line is indented too.
    while (i < lines.length) {
      const next = lines[i];
      const nested = next.match(ITEM);
      if (BLANK.test(next)) {
        if (i + 1 < lines.length && /^\s{2,}\S/.test(lines[i + 1])) {
          body.push('');
          i++;
          continue;
        }
        break;
      }
      if (nested && nested[1].length <= indent) break;
      if (!nested && !/^\s/.test(next) && startsBlock(next)) break;
      body.push(next.startsWith(pad) ? next.slice(width) : next.trimStart());
      i++;
    }
    const li = { tag: 'li', kids: [] };
    if (body.length === 1) li.kids = inline(body[0], base);
    else if (depth >= MAX_DEPTH) li.kids = [body.join('\n')];
    else blocks(body, li.kids, depth + 1, base);
    el.kids.push(li);
    if (i < lines.length && BLANK.test(lines[i])) i++;
  }
  out.push(el);
  return i;
}

function cells(row) {
  let s = row.trim();
  if (s.startsWith('|')) s = s.slice(1);
  if (s.endsWith('|')) s = s.slice(0, -1);
  return s.split('|').map((c) => c.trim());
}

function table(lines, i, out, base) {
  const head = cells(lines[i]);
  const align = cells(lines[i + 1]).map((c) => (c.endsWith(':') ? (c.startsWith(':') ? 'center' : 'right') : ''));
  i += 2;
  const rows = [];
  while (i < lines.length && lines[i].includes('|') && !BLANK.test(lines[i])) rows.push(cells(lines[i++]));
  const cell = (tag, text, k) => {
    const c = { tag, kids: inline(text ?? '', base) };
    if (align[k]) c.attrs = { class: `align-${align[k]}` };
    return c;
  };
  const width = (r) => (head.length <= MAX_PAD_COLUMNS ? head.length : Math.min(r.length, head.length));
  out.push({ tag: 'div', attrs: { class: 'table-wrap' }, kids: [{ tag: 'table', kids: [
    { tag: 'thead', kids: [{ tag: 'tr', kids: head.map((c, k) => cell('th', c, k)) }] },
    { tag: 'tbody', kids: rows.map((r) => ({ tag: 'tr', kids: Array.from({ length: width(r) }, (_, k) => cell('td', r[k], k)) })) },
  ] }] });
  return i;
}

function codeBlock(code, lang) {
  return { tag: 'div', attrs: { class: 'code' }, kids: [
    { tag: 'div', attrs: { class: 'code-head' }, kids: [
      { tag: 'span', kids: [lang || 'code'] },
      { tag: 'button', attrs: { type: 'button', class: 'copy' }, kids: ['Copy'], copy: code },
    ] },
    { tag: 'pre', kids: [{ tag: 'code', attrs: lang ? { class: `lang-${lang.replace(/[^\w-]/g, '')}` } : null, kids: [code] }] },
  ] };
}

// ---------------------------------------------------------------------------------------
// Inline spans: code, escapes, links, autolinks, strong, em, strike. Scanned once from left
// to right; an opener takes the nearest closer of its kind after it (as a lazy regex would),
// found from lists of closer positions built up front, whose cursors only move forward
// because openers are met in order. So a span costs the same whatever follows it.

const EMPHASIS = [
  // [delimiter, element, opener ok at p, closer ok at q]
  ['**', 'strong', (t, p) => nonSpace(t[p + 2]), (t, q) => nonSpace(t[q - 1])],
  ['__', 'strong', (t, p) => nonSpace(t[p + 2]), (t, q) => nonSpace(t[q - 1]) && !isWord(t[q + 2])],
  ['*', 'em', (t, p) => nonSpace(t[p + 1]) && t[p + 1] !== '*', (t, q) => nonSpace(t[q - 1]) && t[q - 1] !== '*'],
  ['_', 'em', (t, p) => !isWord(t[p - 1]) && nonSpace(t[p + 1]) && t[p + 1] !== '_',
    (t, q) => nonSpace(t[q - 1]) && t[q - 1] !== '_' && !isWord(t[q + 1])],
  ['~~', 'del', (t, p) => nonSpace(t[p + 2]), (t, q) => nonSpace(t[q - 1])],
];

// Called for most characters of a reply: ASCII is decided without a regex.
function isSpace(c) {
  const x = c.charCodeAt(0);
  return x < 128 ? x === 32 || (x >= 9 && x <= 13) : SPACE.test(c);
}

function nonSpace(c) {
  return c !== undefined && !isSpace(c);
}

function isWord(c) {
  return c !== undefined && WORD.test(c);
}

/** Closer positions in ascending order, read with a cursor that only moves forward. */
class Positions {
  constructor() {
    this.at = [];
    this.next = 0;
  }

  /** The first position ≥ x (x never decreases between calls), or Infinity. */
  from(x) {
    while (this.next < this.at.length && this.at[this.next] < x) this.next++;
    return this.at[this.next] ?? Infinity;
  }
}

/** For each index, the first index at or after it holding a char that `is` accepts. */
function nextWhere(text, is) {
  const n = text.length;
  const out = new Int32Array(n + 1).fill(n);
  for (let i = n - 1; i >= 0; i--) out[i] = is(text[i]) ? i : out[i + 1];
  return out;
}

// Text without any of these is all text: most table cells and list items.
const MAYBE_INLINE = /[*_~`[\\]|https?:\/\//;

function inline(text, base) {
  if (!MAYBE_INLINE.test(text)) return text ? [text] : [];
  const n = text.length;
  const escaped = new Uint8Array(n);
  for (let i = 0; i + 1 < n; i++) {
    if (text[i] === '\\' && PUNCT.test(text[i + 1])) escaped[++i] = 1;
  }
  const closers = EMPHASIS.map(() => new Positions());
  const ticks = new Map(); // backtick run length → starts
  for (let i = 0; i < n; i++) {
    // Runs of backticks as they stand: inside code a backslash is just a backslash.
    if (text[i] === '`') {
      let k = 1;
      while (text[i + k] === '`') k++;
      if (!ticks.has(k)) ticks.set(k, new Positions());
      ticks.get(k).at.push(i);
      i += k - 1;
      continue;
    }
    const c = text[i];
    if (escaped[i] || (c !== '*' && c !== '_' && c !== '~')) continue;
    for (let e = 0; e < EMPHASIS.length; e++) {
      const [d, , , closes] = EMPHASIS[e];
      if (d[0] === c && (d.length === 1 || text[i + 1] === c) && closes(text, i)) closers[e].at.push(i);
    }
  }
  // Built on the first `[`: for each index, where the next `]`, newline and end of a URL are.
  let closeBracket;
  let newline;
  let urlEnd;

  const out = [];
  spans(0, n, false, 0, out);
  return out;

  function spans(a, b, inLink, depth, out) {
    let last = a;
    let p = a;
    const flush = (to) => {
      if (to > last) out.push(text.slice(last, to));
    };
    while (p < b) {
      const c = text[p];
      if (c === '`') {
        let k = 1;
        while (p + k < b && text[p + k] === '`') k++;
        const q = ticks.get(k)?.from(p + k) ?? Infinity;
        if (q + k <= b) {
          flush(p);
          out.push({ tag: 'code', kids: [text.slice(p + k, q)] });
          last = q + k;
          p = last;
        } else {
          p += k; // an unmatched run is text, all of it
        }
        continue;
      }
      if (c === '\\' && p + 1 < b && PUNCT.test(text[p + 1])) {
        flush(p);
        last = p + 1;
        p += 2;
        continue;
      }
      if (c === '[' && !inLink && depth < MAX_INLINE) {
        if (!closeBracket) {
          closeBracket = nextWhere(text, (ch) => ch === ']');
          newline = nextWhere(text, (ch) => ch === '\n');
          urlEnd = nextWhere(text, (ch) => ch === '(' || ch === ')' || isSpace(ch));
        }
        const close = closeBracket[p + 1];
        if (close > p + 1 && close + 1 < b && newline[p + 1] > close && text[close + 1] === '(') {
          const end = urlEnd[close + 2];
          if (end > close + 2 && end < b && text[end] === ')') {
            flush(p);
            const label = [];
            spans(p + 1, close, true, depth + 1, label);
            link(text.slice(close + 2, end), label, base, out);
            last = end + 1;
            p = last;
            continue;
          }
        }
      }
      if (c === 'h' && !inLink) {
        const end = autolink(p, b);
        if (end > p) {
          flush(p);
          const url = text.slice(p, end);
          link(url, [url], base, out);
          last = end;
          p = end;
          continue;
        }
      }
      if ((c === '*' || c === '_' || c === '~') && depth < MAX_INLINE && !escaped[p]) {
        const found = emphasis(p, b);
        if (found) {
          const [e, q] = found;
          const [d, tag] = EMPHASIS[e];
          flush(p);
          const el = { tag, kids: [] };
          spans(p + d.length, q, inLink, depth + 1, el.kids);
          out.push(el);
          last = q + d.length;
          p = last;
          continue;
        }
      }
      p++;
    }
    flush(b);
  }

  /** The first kind of emphasis that opens at `p` and closes before `b`: [kind, closer]. */
  function emphasis(p, b) {
    for (let e = 0; e < EMPHASIS.length; e++) {
      const [d, , opens] = EMPHASIS[e];
      if (!text.startsWith(d, p) || !opens(text, p)) continue;
      // At least one character inside: the one before the closer, which is not a space.
      const q = closers[e].from(p + d.length + 1);
      if (q + d.length <= b) return [e, q];
    }
    return null;
  }

  /** `http://…` or `https://…` at `p`: the end of the link, or `p` if there is none. */
  function autolink(p, b) {
    const scheme = text.startsWith('https://', p) ? 8 : text.startsWith('http://', p) ? 7 : 0;
    if (!scheme) return p;
    let e = p + scheme;
    while (e < b && !/[\s<>()]/.test(text[e])) e++;
    while (e > p + scheme && /[.,;:!?'"]/.test(text[e - 1])) e--;
    return e > p + scheme ? e : p;
  }
}

/** Only web and mail links become anchors; `javascript:` and the like stay plain text. */
function link(href, kids, base, out) {
  const url = safeUrl(href, base);
  if (url === undefined) {
    for (const k of kids) out.push(k);
  } else if (url === null) {
    out.push({ tag: 'span', kids });
  } else {
    out.push({ tag: 'a', attrs: { href: url, target: '_blank', rel: 'noopener noreferrer nofollow' }, kids });
  }
}

/** The absolute URL if its scheme is allowed, null if not, undefined if it is no URL. */
function safeUrl(href, base) {
  // A thrown error costs ten times a parse; a reply can hold thousands of broken links.
  if (URL.canParse && !URL.canParse(href, base)) return undefined;
  let url;
  try {
    url = new URL(href, base);
  } catch {
    return undefined;
  }
  return SCHEMES.includes(url.protocol) ? url.href : null;
}

// ---------------------------------------------------------------------------------------
// Tree → DOM, creating nothing outside ALLOWED (the parser makes nothing else; this holds
// even if it did).

function build(node) {
  if (typeof node === 'string') return document.createTextNode(node);
  const allowed = ALLOWED[node.tag];
  if (!allowed) return document.createTextNode('');
  const el = document.createElement(node.tag);
  for (const [k, v] of Object.entries(node.attrs ?? {})) {
    if (!allowed.includes(k)) continue;
    if (k === 'href' && !safeUrl(v, 'http://localhost/')) continue;
    el.setAttribute(k, v);
  }
  for (const kid of node.kids ?? []) el.append(build(kid));
  if (node.copy != null) el.addEventListener('click', () => copyText(node.copy, el));
  return el;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = 'Copied';
  } catch {
    button.textContent = 'Copy failed';
  }
  setTimeout(() => { button.textContent = 'Copy'; }, 1500);
}
