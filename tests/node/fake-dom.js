// Just enough of the DOM for the UI's modules to run in Node, recording every element and
// attribute they create so a test can check that nothing outside an allow-list ever was.

export const created = [];

export class Node {
  constructor() {
    this.parentNode = null;
    this.childNodes = [];
  }

  get firstChild() {
    return this.childNodes[0] ?? null;
  }

  get lastChild() {
    return this.childNodes.at(-1) ?? null;
  }

  get children() {
    return this.childNodes.filter((c) => c instanceof Element);
  }

  get textContent() {
    return this.childNodes.map((c) => c.textContent).join('');
  }

  set textContent(v) {
    this.replaceChildren(String(v));
  }

  append(...nodes) {
    for (let n of nodes) {
      if (!(n instanceof Node)) n = new Text(String(n));
      if (n.parentNode === null && !(n instanceof DocumentFragment)) {
        n.parentNode = this;
        this.childNodes.push(n);
        continue;
      }
      if (n instanceof DocumentFragment) {
        const kids = n.childNodes;
        n.childNodes = [];
        for (const k of kids) {
          k.parentNode = null;
          this.append(k);
        }
        continue;
      }
      n.remove();
      n.parentNode = this;
      this.childNodes.push(n);
    }
  }

  replaceChildren(...nodes) {
    for (const c of this.childNodes) c.parentNode = null;
    this.childNodes = [];
    this.append(...nodes);
  }

  remove() {
    const p = this.parentNode;
    if (!p) return;
    p.childNodes.splice(p.childNodes.indexOf(this), 1);
    this.parentNode = null;
  }
}

export class Text extends Node {
  constructor(data) {
    super();
    this.data = data;
  }

  get textContent() {
    return this.data;
  }

  set textContent(v) {
    this.data = String(v);
  }
}

export class DocumentFragment extends Node {}

export class Element extends Node {
  constructor(tag) {
    super();
    this.tagName = tag.toUpperCase();
    this.attrs = null;
    this.listeners = [];
    this.data = null;
    created.push(this);
  }

  get attributes() {
    return this.attrs ?? new Map();
  }

  get dataset() {
    this.data ??= {};
    return this.data;
  }

  setAttribute(k, v) {
    this.attrs ??= new Map();
    this.attrs.set(k, String(v));
  }

  getAttribute(k) {
    return this.attrs?.get(k) ?? null;
  }

  get className() {
    return this.getAttribute('class') ?? '';
  }

  set className(v) {
    this.setAttribute('class', v);
  }

  addEventListener(type, fn) {
    this.listeners.push(type);
    void fn;
  }
}

export function install() {
  globalThis.Node = Node;
  globalThis.document = {
    createElement: (tag) => new Element(tag),
    createTextNode: (data) => new Text(String(data)),
    createDocumentFragment: () => new DocumentFragment(),
  };
  globalThis.location = { href: 'http://localhost:8080/' };
}

/** A stable text form of a node and everything in it, to compare two renders. */
export function serialize(node) {
  if (node instanceof Text) return JSON.stringify(node.data);
  const kids = node.childNodes.map(serialize).join(',');
  if (!(node instanceof Element)) return `[${kids}]`;
  const attrs = [...node.attributes].map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(' ');
  return `<${node.tagName}${attrs ? ` ${attrs}` : ''}>[${kids}]`;
}
