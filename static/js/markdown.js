// A small Markdown renderer for model output. It never parses HTML and never assigns
// innerHTML: every piece of text becomes a text node, so `<script>` or `<img onerror>`
// in a reply shows up as those characters. It is forgiving of half-written input, since
// a streaming reply is re-rendered after every few tokens (an unclosed code fence is a
// code block that is still growing).

import { h } from './dom.js';

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

/** Markdown source → DocumentFragment. */
export function renderMarkdown(src) {
  const frag = document.createDocumentFragment();
  blocks(src.replace(/\r\n?/g, '\n').split('\n'), frag);
  return frag;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)
    || ITEM.test(line);
}

function blocks(lines, out) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i++;
      continue;
    }
    const fence = line.match(FENCE);
    if (fence) {
      const close = new RegExp(`^ {0,3}${fence[1][0]}{${fence[1].length},}\\s*$`);
      const code = [];
      i++;
      while (i < lines.length && !close.test(lines[i])) code.push(lines[i++]);
      i++; // the closing fence, if it came yet
      out.append(codeBlock(code.join('\n'), fence[2]));
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      out.append(h(`h${Math.min(6, heading[1].length + 2)}`, null, inline(heading[2])));
      i++;
      continue;
    }
    if (RULE.test(line)) {
      out.append(h('hr'));
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].replace(QUOTE, ''));
      const q = h('blockquote');
      blocks(inner, q);
      out.append(q);
      continue;
    }
    if (ITEM.test(line)) {
      i = list(lines, i, out);
      continue;
    }
    if (line.includes('|') && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])
        && lines[i + 1].includes('-')) {
      i = table(lines, i, out);
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && !(para.length && startsBlock(lines[i]))) {
      para.push(lines[i++]);
    }
    out.append(h('p', null, inline(para.join('\n'))));
  }
}

function list(lines, i, out) {
  const first = lines[i].match(ITEM);
  const ordered = /\d/.test(first[2]);
  const indent = first[1].length;
  const el = h(ordered ? 'ol' : 'ul');
  if (ordered && parseInt(first[2], 10) !== 1) el.setAttribute('start', String(parseInt(first[2], 10)));
  while (i < lines.length) {
    const m = lines[i].match(ITEM);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    const width = m[1].length + m[2].length + 1;
    i++;
    // The item goes on over indented lines (nested lists, continued text); a blank line
    // ends it unless the next line is indented too.
    while (i < lines.length) {
      const next = lines[i];
      const nested = next.match(ITEM);
      if (!next.trim()) {
        if (i + 1 < lines.length && /^\s{2,}\S/.test(lines[i + 1])) {
          body.push('');
          i++;
          continue;
        }
        break;
      }
      if (nested && nested[1].length <= indent) break;
      if (!nested && !/^\s/.test(next) && startsBlock(next)) break;
      body.push(next.startsWith(' '.repeat(width)) ? next.slice(width) : next.trimStart());
      i++;
    }
    const li = h('li');
    if (body.length === 1) li.append(inline(body[0]));
    else blocks(body, li);
    el.append(li);
    if (i < lines.length && !lines[i].trim()) i++;
  }
  out.append(el);
  return i;
}

function cells(row) {
  return row.trim().replace(/^\||\|$/g, '').split('|').map((c) => c.trim());
}

function table(lines, i, out) {
  const head = cells(lines[i]);
  const align = cells(lines[i + 1]).map((c) => (c.endsWith(':') ? (c.startsWith(':') ? 'center' : 'right') : ''));
  i += 2;
  const body = [];
  while (i < lines.length && lines[i].includes('|') && lines[i].trim()) body.push(cells(lines[i++]));
  const cell = (tag, text, k) => {
    const c = h(tag, null, inline(text ?? ''));
    if (align[k]) c.className = `align-${align[k]}`;
    return c;
  };
  out.append(h('div', { class: 'table-wrap' }, h('table', null,
    h('thead', null, h('tr', null, head.map((c, k) => cell('th', c, k)))),
    h('tbody', null, body.map((r) => h('tr', null, head.map((_, k) => cell('td', r[k], k))))),
  )));
  return i;
}

function codeBlock(code, lang) {
  const copy = h('button', { type: 'button', class: 'copy', text: 'Copy' });
  copy.addEventListener('click', () => copyText(code, copy));
  return h('div', { class: 'code' },
    h('div', { class: 'code-head' }, h('span', { text: lang || 'code' }), copy),
    h('pre', null, h('code', { class: lang ? `lang-${lang.replace(/[^\w-]/g, '')}` : null, text: code })));
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

// Inline spans, earliest match first: code, escapes, links, autolinks, strong, em, strike.
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1,2 code
  /\\([!-/:-@[-`{-~])/.source, // 3 escaped punctuation
  /\[([^\]\n]+)\]\(([^()\s]+)\)/.source, // 4,5 link
  /(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"])/.source, // 6 autolink
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 7 strong
  /__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 8 strong
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 9 em
  /(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])/.source, // 10 em
  /~~(?=\S)([\s\S]*?\S)~~/.source, // 11 strike
].join('|'), 'g');

function inline(text) {
  const frag = document.createDocumentFragment();
  let last = 0;
  // matchAll iterates over its own copy of the regex: inline() recurses for nested spans,
  // and a shared lastIndex would send the outer loop back to the start.
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) frag.append(text.slice(last, m.index));
    last = m.index + m[0].length;
    if (m[1]) frag.append(h('code', { text: m[2] }));
    else if (m[3]) frag.append(m[3]);
    else if (m[4]) frag.append(link(m[5], inline(m[4])));
    else if (m[6]) frag.append(link(m[6], m[6]));
    else if (m[7] ?? m[8]) frag.append(h('strong', null, inline(m[7] ?? m[8])));
    else if (m[9] ?? m[10]) frag.append(h('em', null, inline(m[9] ?? m[10])));
    else if (m[11]) frag.append(h('del', null, inline(m[11])));
  }
  if (last < text.length) frag.append(text.slice(last));
  return frag;
}

/** Only web and mail links become anchors; `javascript:` and the like stay plain text. */
function link(href, content) {
  let url;
  try {
    url = new URL(href, location.href);
  } catch {
    return content;
  }
  if (!['http:', 'https:', 'mailto:'].includes(url.protocol)) {
    return typeof content === 'string' ? content : h('span', null, content);
  }
  return h('a', { href: url.href, target: '_blank', rel: 'noopener noreferrer nofollow' }, content);
}
