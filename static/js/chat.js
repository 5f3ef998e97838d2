// The chat view. One SSE feed per open session (`/api/sessions/{id}/stream`) shows every
// reply of the session live, whichever tab or client started it; sending is a plain POST.
// A reasoning model's thinking (`reasoning` events, `reasoning` of stored messages) shows
// collapsed above its answer.
// The feed resumes with Last-Event-ID after a drop, and after a reload from a snapshot
// kept in sessionStorage, so a reply never shows a gap or a repeated word.

import { api } from './api.js';
import { $, fill, fmtMs, h } from './dom.js';
import { plainError } from './errors.js';
import { renderMarkdownInto } from './markdown.js';
import { titleOf } from './sessions.js';
import { Follower } from './sse.js';

const FINAL = new Set(['complete', 'cancelled', 'failed', 'interrupted']);
const snapKey = (id) => `sluice.resume.${id}`;
// The model picked for a chat, remembered in this browser; sent with each message.
const modelKey = (id) => `sluice.model.${id}`;
const TTFT_KEY = 'sluice.ttft';
const TTFT_KEEP = 300;

const genOf = (eventId) => (eventId ? eventId.slice(0, eventId.lastIndexOf('.')) : null);

function ttftAll() {
  try {
    return JSON.parse(localStorage.getItem(TTFT_KEY) ?? '{}') ?? {};
  } catch {
    return {};
  }
}

// Time to first token is measured by the browser that watched the reply start; it is
// remembered per message so it still shows after a reload.
function ttftPut(id, ms) {
  const all = ttftAll();
  all[id] = Math.round(ms);
  const keys = Object.keys(all);
  for (const k of keys.slice(0, Math.max(0, keys.length - TTFT_KEEP))) delete all[k];
  localStorage.setItem(TTFT_KEY, JSON.stringify(all));
}

/** The store keeps a failed reply's error message but not its code. */
function storedError(hm) {
  if (hm.status === 'interrupted') return { code: 'interrupted', message: hm.error ?? '' };
  const upstream = /^upstream\b/.test(hm.error ?? '');
  return { code: upstream ? 'upstream_error' : 'failed', message: hm.error ?? '' };
}

function titleFrom(text) {
  const line = text.trim().split('\n')[0];
  return line.length > 60 ? `${line.slice(0, 57)}…` : line;
}

export class Chat {
  constructor({ sidebar, setTitle, setConn }) {
    this.sidebar = sidebar;
    this.setTitle = setTitle;
    this.setConn = setConn;
    this.cur = null;
    this.agents = [];
    this.dirty = new Set();
    this.els = {
      view: $('#view-chat'), messages: $('#messages'), empty: $('#chat-empty'),
      agent: $('#agent'), agentInfo: $('#agent-info'), banner: $('#chat-banner'), model: $('#model'),
      form: $('#composer'), input: $('#input'), send: $('#send'), stop: $('#stop'),
    };
    const { form, input, stop, agent } = this.els;
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      this.submit();
    });
    input.addEventListener('keydown', (e) => {
      // Enter sends, Shift+Enter is a new line; never while an IME is composing.
      if (e.key === 'Enter' && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
        e.preventDefault();
        this.submit();
      }
    });
    input.addEventListener('input', () => this.grow());
    stop.addEventListener('click', () => this.stop());
    agent.addEventListener('change', () => {
      this.showAgentInfo();
      if (!this.cur && !this.draftModel) this.showModel(this.agentModel(agent.value));
    });
    this.models = [];
    this.draftModel = null;
    this.els.model.addEventListener('change', () => this.pickModel(this.els.model.value));
    // A reload or closing the tab: write the latest resume point now, not in 250 ms.
    window.addEventListener('pagehide', () => this.cur && this.flushSnap(this.cur));
  }

  get id() {
    return this.cur?.id ?? null;
  }

  async loadAgents() {
    try {
      this.agents = (await api('/api/agents')).data.filter((a) => a.is_active !== false);
    } catch {
      this.agents = [];
    }
    const { agent } = this.els;
    const names = this.agents.length ? this.agents.map((a) => a.name) : ['default'];
    agent.replaceChildren(...names.map((n) => h('option', { value: n, text: n })));
    agent.value = names.includes('default') ? 'default' : names[0];
    this.showAgentInfo();
    await this.loadModels();
  }

  /** The models `/v1/models` lists, for the picker. */
  async loadModels() {
    try {
      this.models = (await api('/v1/models')).data.map((m) => m.id);
    } catch {
      this.models = [];
    }
    this.showModel(this.chosenModel());
  }

  agentModel(name) {
    return this.agents.find((a) => a.name === (name || 'default'))?.model ?? '';
  }

  /** The open chat's remembered pick, else its agent's model; a draft's pick likewise. */
  chosenModel() {
    const c = this.cur;
    if (!c) return this.draftModel ?? this.agentModel(this.els.agent.value);
    return localStorage.getItem(modelKey(c.id)) ?? this.agentModel(c.session?.agent);
  }

  showModel(chosen) {
    const { model } = this.els;
    const ids = chosen && !this.models.includes(chosen) ? [chosen, ...this.models] : this.models;
    model.replaceChildren(...ids.map((id) => h('option', { value: id, text: id })));
    if (chosen) model.value = chosen;
  }

  pickModel(id) {
    if (this.cur) localStorage.setItem(modelKey(this.cur.id), id);
    else this.draftModel = id;
  }

  showAgentInfo() {
    const a = this.agents.find((x) => x.name === this.els.agent.value);
    this.els.agentInfo.textContent = a
      ? [`Model ${a.model}`, a.knowledge ? 'uses the knowledge base' : null, a.system_prompt ? `“${a.system_prompt.slice(0, 120)}”` : null].filter(Boolean).join(' · ')
      : '';
  }

  /** An empty chat: the session is created with the chosen agent on the first message. */
  newDraft() {
    this.close();
    this.draftModel = null;
    this.showModel(this.chosenModel());
    this.setTitle('New chat');
    this.els.messages.replaceChildren();
    this.els.empty.hidden = false;
    this.els.form.hidden = false;
    this.hideBanner();
    this.updateControls();
    this.els.input.focus();
  }

  close() {
    const c = this.cur;
    if (!c) return;
    this.flushSnap(c);
    c.follower?.stop();
    clearTimeout(c.historyTimer);
    this.cur = null;
    this.setConn(null);
    this.sidebar.setActive(null);
  }

  async open(id, session = null) {
    if (this.cur?.id === id) return;
    this.close();
    const c = {
      id, session, messages: [], byId: new Map(), byGen: new Map(),
      snap: null, snapTimer: null, follower: null, sendAt: null,
    };
    this.cur = c;
    this.sidebar.setActive(id);
    this.els.empty.hidden = true;
    this.els.form.hidden = false;
    this.hideBanner();
    this.els.messages.replaceChildren(h('p', { class: 'loading', text: 'Loading…' }));
    this.setTitle(session ? titleOf(session) : '…');
    if (!session) {
      try {
        c.session = await api(`/api/sessions/${encodeURIComponent(id)}`);
      } catch (e) {
        if (c === this.cur) this.gone(c, e);
        return;
      }
      if (c !== this.cur) return;
    }
    this.setTitle(titleOf(c.session), c.session.agent);
    this.showModel(this.chosenModel());
    // Opened by its address (another tab made it): list it even before the next refresh.
    if (!this.sidebar.sessions.some((s) => s.id === id)) this.sidebar.upsert(c.session);
    let snap = null;
    try {
      snap = JSON.parse(sessionStorage.getItem(snapKey(id)) ?? 'null');
    } catch {
      // A damaged snapshot only costs the resume point; the feed starts afresh.
    }
    if (snap?.messageId) {
      c.snap = snap;
      const m = {
        id: snap.messageId, role: 'assistant', content: snap.content ?? '', reasoning: snap.reasoning ?? '',
        status: 'streaming', gen: snap.gen, live: true, ttft: snap.ttft, fromSnap: true,
      };
      this.add(c, m);
    }
    c.follower = new Follower({
      url: `/api/sessions/${encodeURIComponent(id)}/stream`,
      lastEventId: snap?.lastId ?? null,
      onOpen: () => this.loadHistory(c),
      onEvent: (ev) => this.onEvent(c, ev),
      onStatus: (s, x) => {
        if (c !== this.cur) return;
        if (s === 'closed') this.gone(c, x);
        else this.setConn(s, x);
      },
    }).start();
    this.updateControls();
    this.els.input.focus();
  }

  /** The sidebar renamed a session; if it is the open one, its title changes too. */
  renamed(session) {
    if (this.cur?.id !== session.id) return;
    this.cur.session = session;
    this.setTitle(titleOf(session), session.agent);
  }

  gone(c, e) {
    c.follower?.stop();
    const words = e?.status === 404 ? 'This chat does not exist, or it was deleted.' : plainError(e).title;
    this.els.messages.replaceChildren(h('p', { class: 'empty-note', text: words }));
    this.els.form.hidden = true;
    this.setConn(null);
  }

  add(c, m) {
    c.messages.push(m);
    c.byId.set(m.id, m);
    if (m.gen) c.byGen.set(m.gen, m);
  }

  /**
   * Merges the stored history with what the feed is showing. A reply the feed is following,
   * or has seen end, keeps what the feed showed until the store has it final too (a history
   * read answered before the reply ended may arrive after its end); from then on the stored
   * text wins and late events for it are ignored, so nothing is ever appended twice.
   */
  async loadHistory(c) {
    const { data } = await api(`/api/sessions/${encodeURIComponent(c.id)}/messages`);
    if (c !== this.cur) return;
    const next = [];
    const seen = new Set();
    const ttft = ttftAll();
    for (const hm of data) {
      seen.add(hm.id);
      let m = c.byId.get(hm.id);
      if (m && (m.live || FINAL.has(m.status)) && !FINAL.has(hm.status)) {
        next.push(m);
        continue;
      }
      if (!m) m = { id: hm.id };
      Object.assign(m, {
        role: hm.role, content: hm.content, reasoning: hm.reasoning ?? '', status: hm.status, model: hm.model,
        prompt_tokens: hm.prompt_tokens, completion_tokens: hm.completion_tokens,
        error: hm.error || hm.status === 'interrupted' ? storedError(hm) : null,
        gen: hm.generation_id, live: false, pending: false, fromSnap: false,
      });
      m.ttft ??= ttft[hm.id];
      if (m.gen) c.byGen.set(m.gen, m);
      if (c.snap?.messageId === m.id && FINAL.has(m.status)) this.clearSnap(c);
      next.push(m);
    }
    // Not stored yet, or never will be: a message being sent, one that failed to send, a
    // reply whose start the feed showed a moment before the store listed it.
    for (const m of c.messages) {
      if (!seen.has(m.id) && (m.pending || m.failed || (m.live && !m.fromSnap))) next.push(m);
    }
    if (c.snap && !seen.has(c.snap.messageId)) this.clearSnap(c);
    c.messages = next;
    c.byId = new Map(next.map((m) => [m.id, m]));
    this.paintAll(c);
    // For tests and embedders: the page now shows the history it read.
    document.dispatchEvent(new CustomEvent('sluice:history', { detail: { session: c.id } }));
  }

  scheduleHistory(c) {
    clearTimeout(c.historyTimer);
    c.historyTimer = setTimeout(() => this.loadHistory(c).catch(() => {}), 100);
  }

  onEvent(c, ev) {
    if (c !== this.cur) return;
    let d;
    try {
      d = JSON.parse(ev.data);
    } catch {
      return;
    }
    let m;
    if (ev.event === 'start') {
      m = c.byId.get(d.message_id);
      if (m && FINAL.has(m.status)) return;
      if (!m) {
        // Another tab or client sent this message: fetch it to show above the reply.
        m = { id: d.message_id, role: 'assistant' };
        this.add(c, m);
        this.scheduleHistory(c);
      }
      Object.assign(m, {
        content: '', reasoning: '', status: 'streaming', live: true, gen: d.generation_id, model: d.model,
        t0: m.t0 ?? c.sendAt ?? performance.now(),
      });
      c.sendAt = null;
      c.byGen.set(m.gen, m);
    } else {
      m = c.byGen.get(genOf(ev.id));
      if (!m?.live) return;
      switch (ev.event) {
        case 'reasoning':
        case 'token':
          // The model's first output is its first token, thinking or not.
          if (m.ttft == null && m.t0 != null) {
            m.ttft = performance.now() - m.t0;
            ttftPut(m.id, m.ttft);
          }
          if (ev.event === 'token') m.content += d.text ?? '';
          else m.reasoning = (m.reasoning ?? '') + (d.text ?? '');
          break;
        case 'usage':
          m.prompt_tokens = d.prompt_tokens;
          m.completion_tokens = d.completion_tokens;
          break;
        case 'done':
          m.status = d.finish_reason === 'cancelled' ? 'cancelled' : 'complete';
          break;
        case 'error':
          // `lagged`: the feed ends and the follower resumes from the last id by itself.
          if (d.code === 'lagged') return;
          m.status = 'failed';
          m.error = { code: d.code, message: d.message };
          break;
        case 'interrupted':
          m.status = 'interrupted';
          m.error = { code: 'interrupted', message: d.reason ?? '' };
          break;
        default:
          return;
      }
    }
    if (FINAL.has(m.status)) {
      m.live = false;
      if (m.t0 != null) m.elapsed = performance.now() - m.t0;
      this.clearSnap(c);
      this.sidebar.refresh();
    } else if (ev.id) {
      this.saveSnap(c, m, ev.id);
    }
    this.schedulePaint(m);
  }

  // The resume point survives a reload: the text and thinking so far and the id of the
  // event they end with, written together so they always agree.
  saveSnap(c, m, lastId) {
    c.snap = { gen: m.gen, messageId: m.id, lastId, content: m.content, reasoning: m.reasoning, ttft: m.ttft };
    c.snapTimer ??= setTimeout(() => this.flushSnap(c), 250);
  }

  flushSnap(c) {
    clearTimeout(c.snapTimer);
    c.snapTimer = null;
    if (c.snap) sessionStorage.setItem(snapKey(c.id), JSON.stringify(c.snap));
  }

  clearSnap(c) {
    clearTimeout(c.snapTimer);
    c.snapTimer = null;
    c.snap = null;
    sessionStorage.removeItem(snapKey(c.id));
  }

  busy() {
    return !!this.cur?.messages.some((m) => m.role === 'assistant' && m.status === 'streaming');
  }

  updateControls() {
    const busy = this.busy();
    this.els.send.hidden = busy;
    this.els.stop.hidden = !busy;
    if (!busy) {
      this.els.stop.disabled = false;
      this.els.stop.textContent = 'Stop';
    }
  }

  grow() {
    const { input } = this.els;
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight, 220)}px`;
  }

  async submit() {
    const text = this.els.input.value;
    if (!text.trim()) return;
    if (this.busy()) {
      this.showBanner({ code: 'generation_running' });
      return;
    }
    this.els.input.value = '';
    this.grow();
    await this.send(text);
  }

  async send(text) {
    this.hideBanner();
    if (!this.cur) {
      let s;
      try {
        s = await api('/api/sessions', {
          method: 'POST', body: { agent: this.els.agent.value || undefined, title: titleFrom(text) },
        });
      } catch (e) {
        this.els.input.value ||= text;
        this.showBanner(e, () => this.send(text));
        return;
      }
      this.sidebar.upsert(s);
      if (this.draftModel) localStorage.setItem(modelKey(s.id), this.draftModel);
      this.draftModel = null;
      // Open first, so the route change that follows finds this chat already open.
      this.open(s.id, s);
      location.hash = `#/chat/${s.id}`;
    }
    const c = this.cur;
    const local = { id: `local:${Date.now()}:${Math.random()}`, role: 'user', content: text, status: 'complete', pending: true };
    this.add(c, local);
    this.paintAll(c, true);
    c.sendAt = performance.now();
    try {
      const r = await api(`/api/sessions/${encodeURIComponent(c.id)}/messages`, {
        method: 'POST', body: { content: text, model: this.chosenModel() || undefined },
      });
      if (c !== this.cur) return;
      local.pending = false;
      c.byId.delete(local.id);
      if (c.byId.has(r.user_message_id)) {
        c.messages = c.messages.filter((m) => m !== local);
      } else {
        local.id = r.user_message_id;
        c.byId.set(local.id, local);
      }
      if (!c.byId.has(r.message_id)) {
        this.add(c, {
          id: r.message_id, role: 'assistant', content: '', reasoning: '', status: 'streaming',
          gen: r.generation_id, live: true, t0: c.sendAt,
        });
      }
      this.paintAll(c);
      this.sidebar.refresh();
    } catch (e) {
      if (c !== this.cur) return;
      local.pending = false;
      local.failed = true;
      this.paintAll(c);
      this.showBanner(e, () => {
        c.messages = c.messages.filter((m) => m !== local);
        c.byId.delete(local.id);
        this.paintAll(c);
        this.send(text);
      });
    }
  }

  retry(m) {
    const c = this.cur;
    if (!c || this.busy()) return;
    const i = c.messages.indexOf(m);
    const user = c.messages.slice(0, i).reverse().find((x) => x.role === 'user');
    if (user) this.send(user.content);
  }

  async stop() {
    const c = this.cur;
    if (!c || !this.busy()) return;
    this.els.stop.disabled = true;
    this.els.stop.textContent = 'Stopping…';
    try {
      await api(`/api/sessions/${encodeURIComponent(c.id)}/cancel`, { method: 'POST' });
    } catch (e) {
      this.showBanner(e, () => this.stop());
      this.els.stop.disabled = false;
      this.els.stop.textContent = 'Stop';
    }
  }

  showBanner(e, retry) {
    const p = plainError(e);
    const { banner } = this.els;
    fill(banner,
      h('div', { class: 'banner-text' }, h('strong', { text: p.title }), p.detail ? h('span', { class: 'detail', text: p.detail }) : null),
      retry && p.retryable ? h('button', { type: 'button', class: 'retry', text: 'Retry', onclick: () => { this.hideBanner(); retry(); } }) : null,
      h('button', { type: 'button', class: 'icon-button', 'aria-label': 'Dismiss', text: '✕', onclick: () => this.hideBanner() }),
    );
    banner.hidden = false;
  }

  hideBanner() {
    this.els.banner.hidden = true;
  }

  // Painting is batched per animation frame: a fast stream re-renders a reply at most
  // once a frame, however many tokens arrived in it.
  schedulePaint(m) {
    this.dirty.add(m);
    if (this.frame) return;
    const run = () => {
      this.frame = null;
      const c = this.cur;
      if (!c) return;
      const stick = this.atBottom();
      for (const d of this.dirty) if (c.byId.get(d.id) === d) this.paintSafely(d);
      this.dirty.clear();
      if (stick) this.scrollDown();
      this.updateControls();
    };
    // Hidden tabs get no animation frames; they still keep their reply up to date.
    this.frame = document.hidden ? setTimeout(run, 200) : requestAnimationFrame(run);
  }

  paintAll(c, forceScroll = false) {
    if (c !== this.cur) return;
    const stick = forceScroll || this.atBottom() || this.els.messages.querySelector('.loading');
    this.els.messages.replaceChildren(...c.messages.map((m) => this.paintSafely(m)));
    if (!c.messages.length) {
      this.els.messages.append(h('p', { class: 'empty-note', text: 'No messages yet. Say hello below.' }));
    }
    if (stick) this.scrollDown();
    this.updateControls();
  }

  atBottom() {
    const el = this.els.messages;
    return el.scrollHeight - el.scrollTop - el.clientHeight < 120;
  }

  scrollDown() {
    this.els.messages.scrollTop = this.els.messages.scrollHeight;
  }

  // One message that cannot be painted must not stop the others (or the next frame).
  paintSafely(m) {
    try {
      return this.paint(m);
    } catch (e) {
      console.error('painting a message failed', e);
      // Its text still shows, plain; the next change to it tries again.
      m.el ??= h('article', { class: `msg ${m.role}` }, h('div', { class: 'bubble' }, h('div', { class: 'body' })));
      const body = m.el.querySelector('.body');
      if (body) {
        body.textContent = m.content ?? '';
        body.classList.add('plain');
      }
      m.painted = undefined;
      return m.el;
    }
  }

  paint(m) {
    if (!m.el) {
      m.el = h('article', { class: `msg ${m.role}` },
        h('div', { class: 'bubble' },
          // Collapsed unless the reader opens it; repaints leave `open` alone.
          h('details', { class: 'reasoning', hidden: true },
            h('summary', { text: 'Reasoning' }),
            h('div', { class: 'reasoning-body' })),
          h('div', { class: 'body' }),
          h('div', { class: 'msg-error', role: 'alert', hidden: true }),
          h('footer', { class: 'meta' })));
    }
    const [thinking, body, err, meta] = m.el.firstChild.children;
    if (m.paintedReasoning !== (m.reasoning ?? '')) {
      m.paintedReasoning = m.reasoning ?? '';
      // Shown as plain text: thinking is a draft, not the answer's formatted Markdown.
      thinking.lastChild.textContent = m.paintedReasoning;
      thinking.hidden = !m.paintedReasoning;
    }
    m.el.dataset.id = m.id;
    m.el.dataset.status = m.status ?? '';
    // Screen readers announce the reply once it is whole, not after every token.
    m.el.setAttribute('aria-busy', String(m.status === 'streaming'));
    if (m.role === 'user') {
      body.textContent = m.content;
    } else if (m.painted !== m.content) {
      m.painted = m.content;
      try {
        renderMarkdownInto(body, m.content ?? '');
        body.classList.remove('plain');
      } catch (e) {
        // A reply the renderer cannot handle still shows, as the text the model sent.
        console.error('rendering a reply failed', e);
        body.textContent = m.content ?? '';
        body.classList.add('plain');
      }
    }
    const failed = m.status === 'failed' || m.status === 'interrupted';
    // Rebuilt only when the error changes, so a focused Retry button stays put.
    const errorKey = failed ? `${m.status}:${m.error?.code}:${m.error?.message}` : '';
    if (errorKey === m.paintedError) {
      // unchanged
    } else if (failed) {
      m.paintedError = errorKey;
      const p = plainError(m.error ?? { code: m.status });
      fill(err,
        h('div', { class: 'banner-text' }, h('strong', { text: p.title }), p.detail ? h('span', { class: 'detail', text: p.detail }) : null),
        p.retryable ? h('button', { type: 'button', class: 'retry', text: 'Retry', onclick: () => this.retry(m) }) : null,
      );
      err.hidden = false;
    } else {
      m.paintedError = '';
      err.hidden = true;
    }
    meta.replaceChildren(...this.metaParts(m));
    meta.hidden = !meta.childElementCount;
    return m.el;
  }

  metaParts(m) {
    if (m.role === 'user') {
      if (m.failed) return [h('span', { class: 'bad', text: 'Not sent' })];
      return m.pending ? [h('span', { text: 'Sending…' })] : [];
    }
    const parts = [];
    if (m.status === 'streaming') {
      const doing = m.content ? 'Writing…' : m.reasoning ? 'Reasoning…' : 'Waiting for the model…';
      parts.push(h('span', { class: 'live', text: doing }));
    }
    if (m.status === 'cancelled') parts.push(h('span', { class: 'badge stopped', text: 'Stopped' }));
    if (m.model) parts.push(h('span', { class: 'model', text: m.model }));
    if (m.completion_tokens != null) {
      parts.push(h('span', {
        class: 'usage', title: `${m.prompt_tokens ?? '?'} prompt + ${m.completion_tokens} completion tokens`,
        text: `${m.completion_tokens} tokens · ${m.prompt_tokens ?? '?'} in`,
      }));
    }
    if (m.ttft != null) parts.push(h('span', { class: 'ttft', title: 'Time to first token', text: `first token ${fmtMs(m.ttft)}` }));
    if (m.elapsed != null && m.status !== 'streaming') parts.push(h('span', { class: 'elapsed', text: `${fmtMs(m.elapsed)} total` }));
    return parts;
  }
}
