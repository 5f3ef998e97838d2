// The sessions sidebar: newest first, paged, rename in place, delete with a confirm step.

import { api } from './api.js';
import { $, h, relTime } from './dom.js';
import { plainError } from './errors.js';

const PAGE = 30;

export function titleOf(s) {
  return s?.title?.trim() || 'Untitled chat';
}

export class Sidebar {
  constructor({ onDeleted }) {
    this.list = $('#sessions');
    this.more = $('#sessions-more');
    this.onDeleted = onDeleted;
    this.sessions = [];
    this.cursor = null;
    this.activeId = null;
    this.more.addEventListener('click', () => this.load(true));
  }

  async load(more = false) {
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (more && this.cursor) q.set('cursor', this.cursor);
    try {
      const page = await api(`/api/sessions?${q}`);
      this.sessions = more ? [...this.sessions, ...page.data] : page.data;
      this.cursor = page.next_cursor ?? null;
      this.render();
    } catch (e) {
      this.list.replaceChildren(h('li', { class: 'sessions-note', text: plainError(e).title }));
    }
  }

  /** Reloads the first page without losing pages already shown further down. */
  refresh() {
    clearTimeout(this.pending);
    this.pending = setTimeout(() => this.load(false), 150);
  }

  setActive(id) {
    this.activeId = id;
    for (const li of this.list.children) {
      if (li.dataset.id === id) li.setAttribute('aria-current', 'page');
      else li.removeAttribute('aria-current');
    }
  }

  upsert(session) {
    const i = this.sessions.findIndex((s) => s.id === session.id);
    if (i >= 0) this.sessions[i] = session;
    else this.sessions.unshift(session);
    this.render();
  }

  render() {
    // A refresh (a reply just finished) must not throw away a title being typed.
    if (this.editing) {
      this.stale = true;
      return;
    }
    this.stale = false;
    this.more.hidden = !this.cursor;
    if (!this.sessions.length) {
      this.list.replaceChildren(h('li', { class: 'sessions-note', text: 'No chats yet.' }));
      return;
    }
    this.list.replaceChildren(...this.sessions.map((s) => this.item(s)));
    this.setActive(this.activeId);
  }

  item(s) {
    const li = h('li', { class: 'session', dataset: { id: s.id } });
    const link = h('a', { class: 'session-link', href: `#/chat/${s.id}` },
      h('span', { class: 'session-title', text: titleOf(s) }),
      h('span', { class: 'session-time', text: [s.agent && s.agent !== 'default' ? s.agent : null, relTime(s.updated_at)].filter(Boolean).join(' · ') }));
    const rename = h('button', {
      type: 'button', class: 'icon-button session-rename', 'aria-label': `Rename ${titleOf(s)}`, title: 'Rename', text: '✎',
      onclick: () => this.startRename(li, s),
    });
    const del = h('button', {
      type: 'button', class: 'icon-button session-delete', 'aria-label': `Delete ${titleOf(s)}`, title: 'Delete', text: '✕',
      onclick: () => this.confirmDelete(del, s),
    });
    li.append(link, h('div', { class: 'session-actions' }, rename, del));
    return li;
  }

  startRename(li, s) {
    const input = h('input', { class: 'session-rename-input', value: s.title ?? '', 'aria-label': 'Chat title', maxlength: '200' });
    let done = false;
    this.editing = s.id;
    const finish = async (save) => {
      if (done) return;
      done = true;
      this.editing = null;
      const title = input.value.trim();
      if (save && title !== (s.title ?? '')) {
        try {
          const updated = await api(`/api/sessions/${s.id}`, { method: 'PATCH', body: { title: title || null } });
          this.upsert(updated);
          window.dispatchEvent(new CustomEvent('sluice:renamed', { detail: updated }));
          return;
        } catch (e) {
          alertLater(plainError(e).title);
        }
      }
      this.render();
    };
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') { e.preventDefault(); finish(true); }
      if (e.key === 'Escape') { e.preventDefault(); e.stopPropagation(); finish(false); }
    });
    input.addEventListener('blur', () => finish(true));
    li.replaceChildren(input);
    input.focus();
    input.select();
  }

  confirmDelete(button, s) {
    if (button.dataset.confirm) {
      this.remove(s);
      return;
    }
    // A second click within a few seconds confirms: no modal dialog to dismiss.
    button.dataset.confirm = '1';
    button.textContent = 'Delete?';
    button.classList.add('confirm');
    setTimeout(() => {
      if (!button.isConnected) return;
      delete button.dataset.confirm;
      button.textContent = '✕';
      button.classList.remove('confirm');
    }, 4000);
  }

  async remove(s) {
    try {
      await api(`/api/sessions/${s.id}`, { method: 'DELETE' });
    } catch (e) {
      if (e.status !== 404) {
        alertLater(plainError(e).title);
        return;
      }
    }
    this.sessions = this.sessions.filter((x) => x.id !== s.id);
    this.render();
    this.onDeleted?.(s.id);
  }
}

function alertLater(text) {
  window.dispatchEvent(new CustomEvent('sluice:toast', { detail: text }));
}
