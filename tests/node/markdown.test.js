// The chat UI's Markdown renderer (static/js/markdown.js) against hostile input: deep
// nesting, long runs of one character, random input. Whatever the input, it creates only
// the allowed elements, attributes and URL schemes, keeps the DOM shallow, and finishes
// within a bounded time. PROPTEST_CASES sets the number of random cases (default 256).

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import fc from 'fast-check';

import { created, Element, install, serialize } from './fake-dom.js';

install();
const md = await import('../../static/js/markdown.js');

const CASES = Number(process.env.PROPTEST_CASES ?? 256);
/** A render of up to 100 KB must take less CPU time than this. */
const LIMIT_MS = 200;
/** Deepest element nesting a render may produce. */
const MAX_DOM_DEPTH = 80;

// The allow-list, written out here rather than imported, so that loosening the renderer's
// own list fails this test.
const URL_OK = (v) => ['http:', 'https:', 'mailto:'].includes(new URL(v).protocol);
const ALLOW = {
  P: {}, H3: {}, H4: {}, H5: {}, H6: {}, HR: {}, BLOCKQUOTE: {}, UL: {}, LI: {},
  OL: { start: /^\d{1,10}$/ },
  DIV: { class: /^(table-wrap|code|code-head)$/ },
  SPAN: {}, TABLE: {}, THEAD: {}, TBODY: {}, TR: {},
  TH: { class: /^align-(right|center)$/ },
  TD: { class: /^align-(right|center)$/ },
  PRE: {},
  CODE: { class: /^lang-[\w-]*$/ },
  BUTTON: { type: /^button$/, class: /^copy$/ },
  STRONG: {}, EM: {}, DEL: {},
  A: { href: URL_OK, target: /^_blank$/, rel: /^noopener noreferrer nofollow$/ },
};

function allowed(el) {
  const rules = ALLOW[el.tagName];
  assert.ok(rules, `created <${el.tagName}>`);
  for (const [k, v] of el.attributes) {
    const rule = rules[k];
    assert.ok(rule, `<${el.tagName}> got attribute ${k}=${JSON.stringify(v)}`);
    assert.ok(typeof rule === 'function' ? rule(v) : rule.test(v), `<${el.tagName} ${k}=${JSON.stringify(v)}>`);
  }
  for (const type of el.listeners) {
    assert.ok(el.tagName === 'BUTTON' && type === 'click', `<${el.tagName}> listens to ${type}`);
  }
}

function depth(node) {
  let deepest = 0;
  const stack = [[node, 0]];
  while (stack.length) {
    const [n, d] = stack.pop();
    deepest = Math.max(deepest, d);
    for (const k of n.childNodes) if (k instanceof Element) stack.push([k, d + 1]);
  }
  return deepest;
}

/** CPU milliseconds of this process: unlike wall time, not stretched by other processes. */
function cpuMs() {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1000;
}

/** Renders `src`, checks every element created on the way, returns the fragment and the time. */
function render(src) {
  const mark = created.length;
  const t = cpuMs();
  const frag = md.renderMarkdown(src);
  const ms = cpuMs() - t;
  for (const el of created.slice(mark)) allowed(el);
  created.length = mark;
  return { frag, ms };
}

/** The best of up to three renders: a collection or a cold cache can slow one. */
function timed(src) {
  let best = render(src);
  for (let i = 0; i < 2 && best.ms >= LIMIT_MS; i++) {
    const again = render(src);
    if (again.ms < best.ms) best = again;
  }
  return best;
}

function bounded(name, src, mustShow) {
  const { frag, ms } = timed(src);
  assert.ok(ms < LIMIT_MS, `${name}: ${src.length} chars took ${ms.toFixed(0)} ms`);
  const d = depth(frag);
  assert.ok(d <= MAX_DOM_DEPTH, `${name}: nested ${d} elements deep`);
  if (mustShow) assert.ok(frag.textContent.includes(mustShow), `${name}: ${mustShow} is shown`);
}

describe('deep nesting', () => {
  const cases = {
    '10,000 >': `${'>'.repeat(10_000)} bottom`,
    '10,000 > with spaces': `${'> '.repeat(10_000)}bottom`,
    '10,000 > over lines': Array.from({ length: 200 }, () => `${'>'.repeat(10_000)} bottom`).join('\n'),
    '10,000 nested list items': `${'- '.repeat(10_000)}bottom\n  more`,
    '10,000 nested ordered items': `${'1. '.repeat(10_000)}bottom\n   more`,
    'quotes in lists in quotes': `${'> - '.repeat(5_000)}bottom\n  more`,
    '10,000 nested emphasis': `${'*_'.repeat(5_000)}bottom${'_*'.repeat(5_000)}`,
    'emphasis of every kind': `${'**~~_*'.repeat(2_500)}bottom${'*_~~**'.repeat(2_500)}`,
    '10,000 nested brackets': `${'['.repeat(10_000)}bottom${'](http://a)'.repeat(10_000)}`,
  };
  for (const [name, src] of Object.entries(cases)) {
    test(name, () => bounded(name, src, 'bottom'));
  }
});

describe('long runs', () => {
  const cases = {
    'heading with 40,000 spaces': `# a${' '.repeat(40_000)}b`,
    'heading of spaces then #': `#${' '.repeat(40_000)}x ${' '.repeat(40_000)}#`,
    'heading of 100,000 #': '#'.repeat(100_000),
    '100,000 *': '*'.repeat(100_000),
    '100,000 _': '_'.repeat(100_000),
    '100,000 ~': '~'.repeat(100_000),
    '100,000 backticks': '`'.repeat(100_000),
    'backtick runs of every length': Array.from({ length: 440 }, (_, i) => '`'.repeat(i + 1)).join(' '),
    'single backticks': '` '.repeat(50_000),
    '100,000 [': '['.repeat(100_000),
    '100,000 ]': ']'.repeat(100_000),
    'unclosed links': '[a]('.repeat(25_000),
    'links without a target': '[a]'.repeat(33_000),
    'openers without closers': '**a '.repeat(25_000),
    'underscores in words': 'a_b '.repeat(25_000),
    'escapes': '\\'.repeat(100_000),
    'autolinks': 'http://'.repeat(14_000),
    'autolink of punctuation': `http://${'.'.repeat(100_000)}`,
    'broken autolinks': 'http://]('.repeat(11_000),
    'broken links': '[a](http://[)'.repeat(7_500),
    '100,000 spaces': `${' '.repeat(100_000)}x`,
    'rule of 100,000 -': '-'.repeat(100_000),
    'almost a rule': `${'- '.repeat(50_000)}x`,
    'table of 10,000 columns and rows': `${'|'.repeat(10_000)}\n${'-|'.repeat(10_000)}\n${'|\n'.repeat(10_000)}`,
    'table separator of spaces': `a|b\n${' '.repeat(50_000)}x`,
    '50,000 lines': 'a\n'.repeat(50_000),
    'list items': '- a\n'.repeat(25_000),
    'code fences': '```\n'.repeat(25_000),
  };
  for (const [name, src] of Object.entries(cases)) {
    test(name, () => bounded(name, src));
  }
});

// Pieces that mean something to the renderer, and some that must never become markup.
const PIECES = [
  '*', '**', '_', '__', '~~', '`', '```', '~~~', '[', ']', '(', ')', '](', '\\', '>', '> ', '#', '## ',
  ' ', '  ', '    ', '\n', '\n\n', '\t', '-', '- ', '1. ', '2) ', '+ ', '|', '|---|', ':-:', '---',
  'a', 'word', 'x_y', 'http://', 'https://example.com/a?b=1', 'mailto:a@b.c', 'javascript:alert(1)',
  'JaVaScRiPt:x', 'data:text/html,<b>', 'vbscript:x', '//evil.example', 'ftp://x', '&lt;', '&amp;',
  '<script>alert(1)</script>', '<img src=x onerror=alert(1)>', '<a href="javascript:x">', '"', "'",
  'onerror=', 'style=', 'é', '\u2028', '\u0000', '\r\n', '\r',
];
const piece = fc.constantFrom(...PIECES);
const markdown = fc.oneof(
  fc.array(piece, { maxLength: 200 }).map((a) => a.join('')),
  fc.string({ maxLength: 200 }),
  fc.array(fc.oneof(piece, fc.string({ maxLength: 4 })), { maxLength: 200 }).map((a) => a.join('')),
);

describe('random input', () => {
  test('only allowed elements, attributes and schemes, shallow and fast', () => {
    fc.assert(fc.property(markdown, (src) => {
      bounded('random', src);
    }), { numRuns: CASES });
  });

  test('100 KB of a repeated random pattern renders within the limit', () => {
    const big = fc.array(piece, { minLength: 1, maxLength: 12 }).map((a) => {
      const unit = a.join('');
      return unit.repeat(Math.ceil(100_000 / unit.length)).slice(0, 100_000);
    });
    fc.assert(fc.property(big, (src) => {
      bounded('100 KB', src);
    }), { numRuns: Math.max(8, Math.ceil(CASES / 8)) });
  });

  test('links keep only web and mail addresses', () => {
    const target = fc.oneof(fc.constantFrom(...PIECES), fc.string({ maxLength: 30 }));
    fc.assert(fc.property(target, fc.string({ maxLength: 10 }), (href, label) => {
      const { frag } = render(`[${label}x](${href}) ${href}`);
      const walk = (n) => n.childNodes.forEach((k) => {
        if (!(k instanceof Element)) return;
        if (k.tagName === 'A') assert.ok(URL_OK(k.getAttribute('href')), k.getAttribute('href'));
        walk(k);
      });
      walk(frag);
    }), { numRuns: CASES });
  });
});

describe('streaming', () => {
  const holder = () => {
    const el = new Element('div');
    created.pop();
    return el;
  };
  const fresh = (src) => {
    const el = holder();
    el.append(md.renderMarkdown(src));
    return serialize(el);
  };

  test('rendering a growing reply in place gives what a fresh render gives', () => {
    const steps = fc.array(fc.tuple(fc.array(piece, { maxLength: 12 }), fc.boolean()), { maxLength: 30 });
    fc.assert(fc.property(steps, (list) => {
      const el = holder();
      let text = '';
      for (const [more, restart] of list) {
        // Mostly appended, as a stream grows; sometimes replaced, as the stored text may be.
        text = restart ? more.join('') : text + more.join('');
        md.renderMarkdownInto(el, text);
        assert.equal(serialize(el), fresh(text), JSON.stringify(text));
        created.length = 0;
      }
    }), { numRuns: CASES });
  });

  test('a 100 KB reply streamed in 100-byte pieces keeps every frame short', () => {
    const section = (i) => `## Part ${i}\n\nSome **bold** text, a [link](https://example.com/${i}) `
      + `and \`code\`.\n\n- one\n- two\n  - nested\n\n> quoted\n\n\`\`\`js\nconst x = ${i};\n\`\`\`\n\n`
      + '| a | b |\n|---|--:|\n| 1 | 2 |\n\n';
    let reply = '';
    for (let i = 0; reply.length < 100_000; i++) reply += section(i);
    const el = holder();
    const times = [];
    let most = 0;
    for (let n = 100; n < reply.length + 100; n += 100) {
      const mark = created.length;
      const t = cpuMs();
      md.renderMarkdownInto(el, reply.slice(0, n));
      times.push(cpuMs() - t);
      most = Math.max(most, created.length - mark);
      created.length = mark;
    }
    assert.equal(serialize(el), fresh(reply));
    // Only the end is rebuilt: a frame creates a few blocks' elements, not the reply's
    // thousands; and the typical frame takes a fraction of a frame's 16 ms.
    assert.ok(most <= 100, `a frame created ${most} elements`);
    times.sort((a, b) => a - b);
    const median = times[times.length >> 1];
    assert.ok(median < 4, `the median frame took ${median.toFixed(1)} ms`);
  });
});
