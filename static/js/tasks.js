// The Tasks view: run a scene with its variables, then watch each task over the page's
// WebSocket (queued → running → progress → result). The server has no "list my tasks"
// route, so the ids of tasks started here are remembered in localStorage.

import { api } from './api.js';
import { $, fill, h, relTime } from './dom.js';
import { plainError } from './errors.js';
import { renderMarkdown } from './markdown.js';

const STORE = 'sluice.tasks';
const KEEP = 20;
const FINAL = new Set(['succeeded', 'failed', 'cancelled']);

/** The `{{ name }}` placeholders of a template, as the server reads them. */
export function placeholders(template) {
  const out = [];
  for (const m of template.matchAll(/\{\{([^}]*)\}\}/g)) {
    const name = m[1].trim();
    if (name && !out.includes(name)) out.push(name);
  }
  return out;
}

function remembered() {
  try {
    return JSON.parse(localStorage.getItem(STORE) ?? '[]') ?? [];
  } catch {
    return [];
  }
}

function remember(list) {
  localStorage.setItem(STORE, JSON.stringify(list.slice(0, KEEP)));
}

export class Tasks {
  constructor({ ws, me }) {
    this.ws = ws;
    this.me = me;
    this.view = $('#view-tasks');
    this.scenes = [];
    this.cards = new Map(); // task id → {el, state}
    this.built = false;
  }

  async show() {
    if (!this.built) this.build();
    await this.loadScenes();
    this.loadTasks();
  }

  hide() {}

  build() {
    this.built = true;
    this.sceneSel = h('select', { id: 'scene', onchange: () => this.showScene() });
    this.sceneInfo = h('p', { class: 'muted scene-info' });
    this.vars = h('div', { class: 'vars' });
    this.runError = h('div', { class: 'banner', role: 'alert', hidden: true });
    this.runBtn = h('button', { type: 'submit', class: 'primary', id: 'run-task', text: 'Run' });
    this.runForm = h('form', { class: 'card run-card', onsubmit: (e) => { e.preventDefault(); this.run(); } },
      h('h2', { text: 'Run a scene' }),
      h('p', { class: 'muted', text: 'A scene is a prompt template bound to an agent. The task runs in the background; its progress shows below as it happens.' }),
      h('label', { for: 'scene', text: 'Scene' }), this.sceneSel, this.sceneInfo, this.vars, this.runError,
      h('div', { class: 'actions' }, this.runBtn));
    this.list = h('ul', { class: 'task-list', id: 'task-list', 'aria-label': 'Recent tasks' });
    this.wsState = h('span', { class: 'conn-inline' });
    this.ws.onStatus((s) => {
      this.wsState.textContent = { live: 'live updates on', connecting: 'connecting…', reconnecting: 'reconnecting…', idle: '' }[s] ?? s;
      this.wsState.dataset.state = s;
    });
    const children = [this.runForm];
    if (this.me.is_admin) children.push(this.sceneForm());
    children.push(h('section', { class: 'tasks-recent' },
      h('h2', null, 'Recent tasks ', this.wsState), this.list));
    this.view.replaceChildren(h('div', { class: 'page' }, children));
  }

  sceneForm() {
    const name = h('input', { id: 'new-scene-name', required: true, placeholder: 'brief', pattern: '[A-Za-z0-9_.-]+' });
    const agent = h('input', { id: 'new-scene-agent', value: 'default', required: true });
    const template = h('textarea', { id: 'new-scene-template', rows: '3', required: true, placeholder: 'Explain {{topic}} to {{audience}}.' });
    const msg = h('p', { class: 'form-error', role: 'alert', hidden: true });
    const form = h('form', { class: 'card' },
      h('details', null, h('summary', { text: 'New scene (admin)' }),
        h('label', { for: 'new-scene-name', text: 'Name' }), name,
        h('label', { for: 'new-scene-agent', text: 'Agent' }), agent,
        h('label', { for: 'new-scene-template', text: 'Template — {{name}} marks a variable' }), template,
        msg, h('div', { class: 'actions' }, h('button', { type: 'submit', text: 'Create scene' }))));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      msg.hidden = true;
      try {
        await api('/api/scenes', { method: 'POST', body: { name: name.value.trim(), agent: agent.value.trim(), template: template.value } });
        const created = name.value.trim();
        form.reset();
        await this.loadScenes();
        this.sceneSel.value = created;
        this.showScene();
      } catch (err) {
        const p = plainError(err);
        msg.textContent = p.detail || p.title;
        msg.hidden = false;
      }
    });
    return form;
  }

  async loadScenes() {
    try {
      this.scenes = (await api('/api/scenes')).data;
    } catch (e) {
      this.scenes = [];
      this.sceneInfo.textContent = plainError(e).title;
    }
    const keep = this.sceneSel.value;
    this.sceneSel.replaceChildren(...this.scenes.map((s) => h('option', { value: s.name, text: s.name })));
    if (this.scenes.some((s) => s.name === keep)) this.sceneSel.value = keep;
    this.runBtn.disabled = !this.scenes.length;
    this.showScene();
  }

  showScene() {
    const s = this.scenes.find((x) => x.name === this.sceneSel.value);
    if (!s) {
      this.sceneInfo.textContent = this.me.is_admin
        ? 'No scenes yet. Create one below.'
        : 'No scenes yet. An admin can create one (POST /api/scenes).';
      this.vars.replaceChildren();
      return;
    }
    this.sceneInfo.replaceChildren(h('span', { text: `Agent ${s.agent} · ` }), h('q', { text: s.template }));
    this.vars.replaceChildren(...placeholders(s.template).map((v) => h('label', { class: 'var' },
      h('span', { text: v }), h('input', { name: v, 'data-var': v, required: true, autocomplete: 'off' }))));
  }

  run() {
    const scene = this.sceneSel.value;
    if (!scene) return;
    const variables = {};
    for (const input of this.vars.querySelectorAll('input[data-var]')) variables[input.dataset.var] = input.value;
    this.start(scene, variables);
  }

  async start(scene, variables) {
    this.runError.hidden = true;
    this.runBtn.disabled = true;
    try {
      const r = await api(`/api/scenes/${encodeURIComponent(scene)}/run`, { method: 'POST', body: { variables } });
      const entry = { id: r.task_id, scene, variables, created: Date.now() };
      remember([entry, ...remembered().filter((t) => t.id !== entry.id)]);
      const card = this.card(entry);
      this.list.prepend(card.el);
      this.apply(card, { status: r.status ?? 'queued' });
      this.follow(card);
    } catch (e) {
      const p = plainError(e);
      fill(this.runError,
        h('div', { class: 'banner-text' }, h('strong', { text: p.title }), p.detail ? h('span', { class: 'detail', text: p.detail }) : null),
        p.retryable ? h('button', { type: 'button', class: 'retry', text: 'Retry', onclick: () => this.start(scene, variables) }) : null);
      this.runError.hidden = false;
    } finally {
      this.runBtn.disabled = !this.scenes.length;
    }
  }

  loadTasks() {
    const list = remembered();
    const cards = list.map((t) => this.cards.get(t.id) ?? this.card(t));
    this.list.replaceChildren(...cards.map((c) => c.el));
    if (!cards.length) this.list.append(h('li', { class: 'muted', text: 'Tasks you run appear here.' }));
    for (const card of cards) {
      if (card.loaded) continue;
      card.loaded = true;
      api(`/api/tasks/${encodeURIComponent(card.entry.id)}`)
        .then((t) => {
          this.apply(card, t);
          if (!FINAL.has(t.status)) this.follow(card);
        })
        .catch((e) => {
          if (e.status === 404) {
            remember(remembered().filter((t) => t.id !== card.entry.id));
            card.el.remove();
            this.cards.delete(card.entry.id);
          } else {
            card.loaded = false;
            this.apply(card, { note: plainError(e).title });
          }
        });
    }
  }

  card(entry) {
    const els = {
      status: h('span', { class: 'badge task-status', text: '…' }),
      tokens: h('span', { class: 'task-tokens muted' }),
      cancel: h('button', { type: 'button', class: 'link task-cancel', text: 'Cancel', hidden: true }),
      bar: h('div', { class: 'progress', hidden: true }, h('div', { class: 'progress-bar' })),
      timeline: h('ol', { class: 'timeline' }),
      reasoning: h('details', { class: 'reasoning task-reasoning', hidden: true },
        h('summary', { text: 'Reasoning' }), h('div', { class: 'reasoning-body' })),
      result: h('div', { class: 'task-result body', hidden: true }),
      error: h('div', { class: 'msg-error', role: 'alert', hidden: true }),
    };
    const vars = Object.entries(entry.variables ?? {}).map(([k, v]) => `${k}=${v}`).join(', ');
    const el = h('li', { class: 'card task', dataset: { taskId: entry.id } },
      h('header', { class: 'task-head' },
        h('strong', { text: entry.scene ?? 'task' }), els.status, els.tokens,
        h('span', { class: 'muted task-when', text: relTime(entry.created ?? Date.now()) }), els.cancel),
      vars ? h('p', { class: 'muted task-vars', text: vars }) : null,
      els.bar, els.timeline, els.reasoning, els.result, els.error);
    const card = { entry, el, els, state: {} };
    els.cancel.addEventListener('click', async () => {
      els.cancel.disabled = true;
      try {
        await api(`/api/tasks/${encodeURIComponent(entry.id)}`, { method: 'DELETE' });
      } catch (e) {
        this.apply(card, { note: plainError(e).title });
      }
      els.cancel.disabled = false;
    });
    this.cards.set(entry.id, card);
    return card;
  }

  follow(card) {
    const topic = `task:${card.entry.id}`;
    card.els.timeline.replaceChildren();
    // The subscription replays the task's events from its start, the thinking among them.
    card.state.reasoning = '';
    card.els.reasoning.lastChild.textContent = '';
    card.els.reasoning.hidden = true;
    this.ws.subscribe(topic, (f) => {
      if (f.event === 'ws_error') {
        this.apply(card, { note: plainError(f.data).title });
        return;
      }
      this.step(card, f.event, f.data ?? {});
      if (FINAL.has(f.event)) this.ws.unsubscribe(topic);
    });
  }

  /** One live event: a line on the timeline and the new state. */
  step(card, event, d) {
    // The model's thinking streams in many small pieces: it grows in place, off the timeline.
    if (event === 'reasoning') {
      this.apply(card, { reasoning: (card.state.reasoning ?? '') + (d.text ?? '') });
      return;
    }
    const line = {
      queued: d.position != null ? `Queued, position ${d.position}` : 'Queued',
      running: 'Running',
      progress: `Progress: ${d.tokens} tokens`,
      succeeded: 'Succeeded',
      failed: 'Failed',
      cancelled: 'Cancelled',
    }[event];
    if (!line) return;
    // The last progress event repeats the count when the reply ends on a multiple of the
    // progress step; one line says it.
    if (card.els.timeline.lastChild?.textContent !== line) {
      card.els.timeline.append(h('li', { dataset: { event }, text: line }));
    }
    const patch = { status: event === 'progress' ? 'running' : event, note: null };
    if (event === 'progress') patch.progress = { tokens: d.tokens };
    if (event === 'queued') patch.position = d.position;
    if (event === 'succeeded') {
      patch.result = d.result;
      if (d.reasoning != null) patch.reasoning = d.reasoning;
    }
    if (event === 'failed') patch.error = d.error;
    this.apply(card, patch);
  }

  apply(card, t) {
    const s = Object.assign(card.state, t);
    const { els } = card;
    els.status.textContent = s.status ?? '…';
    card.el.dataset.status = s.status ?? '';
    els.tokens.textContent = s.progress?.tokens ? `${s.progress.tokens} tokens` : '';
    els.cancel.hidden = FINAL.has(s.status) || !s.status;
    els.bar.hidden = s.status !== 'running' && s.status !== 'queued';
    if (s.reasoning && els.reasoning.lastChild.textContent !== s.reasoning) {
      els.reasoning.lastChild.textContent = s.reasoning;
      els.reasoning.hidden = false;
    }
    if (s.result != null) {
      try {
        els.result.replaceChildren(renderMarkdown(s.result));
      } catch (e) {
        // A result the renderer cannot handle still shows, as plain text.
        console.error('rendering a result failed', e);
        els.result.textContent = s.result;
        els.result.classList.add('plain');
      }
      els.result.hidden = false;
    }
    if (s.status === 'failed' || s.note) {
      const p = s.status === 'failed' ? plainError({ code: 'upstream_error', message: s.error ?? '' }) : { title: s.note, detail: '' };
      fill(els.error,
        h('div', { class: 'banner-text' }, h('strong', { text: s.status === 'failed' ? 'The task failed.' : p.title }),
          p.detail ? h('span', { class: 'detail', text: p.detail }) : null),
        s.status === 'failed' && card.entry.scene
          ? h('button', { type: 'button', class: 'retry', text: 'Run again', onclick: () => this.start(card.entry.scene, card.entry.variables ?? {}) })
          : null);
      els.error.hidden = false;
    } else {
      els.error.hidden = true;
    }
  }
}
