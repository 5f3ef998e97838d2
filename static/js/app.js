// Boot, sign-in and routing. Routes live in the hash (#/chat/<id>, #/new, #/tasks,
// #/admin), so the server only ever serves `/` and a reload lands on the same view.

import { apiRaw, getKey, setKey } from './api.js';
import { Admin } from './admin.js';
import { Chat } from './chat.js';
import { $, h } from './dom.js';
import { plainError } from './errors.js';
import { Sidebar } from './sessions.js';
import { Tasks } from './tasks.js';
import { Ws } from './ws.js';

const views = { chat: $('#view-chat'), tasks: $('#view-tasks'), admin: $('#view-admin') };
let app = null;
const SIGNIN_NOTE = 'sluice.signinNote';

async function whoami() {
  const r = await apiRaw('/api/me');
  if (r.status === 200) return r.data;
  const e = r.data?.error ?? {};
  throw Object.assign(new Error(e.message ?? `HTTP ${r.status}`), { status: r.status, code: e.code });
}

function showSignin(message) {
  $('#boot').hidden = true;
  $('#shell').hidden = true;
  $('#signin').hidden = false;
  const err = $('#signin-error');
  err.textContent = message ?? '';
  err.hidden = !message;
  $('#signin-key').focus();
}

$('#signin-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const key = $('#signin-key').value.trim();
  if (!key) return;
  setKey(key);
  $('#signin-submit').disabled = true;
  try {
    const me = await whoami();
    $('#signin-key').value = '';
    $('#signin').hidden = true;
    start(me);
  } catch (err) {
    setKey('');
    showSignin(err.status === 401 ? 'That key was not accepted. Check it and try again.' : plainError(err).title);
  } finally {
    $('#signin-submit').disabled = false;
  }
});

function setTitle(text, agent) {
  const t = $('#view-title');
  t.replaceChildren(h('span', { class: 'title-text', text }));
  if (agent && agent !== 'default') t.append(h('span', { class: 'badge agent-badge', text: agent }));
  document.title = text ? `${text} · sluice` : 'sluice';
}

function setConn(state, delay) {
  const el = $('#conn');
  el.hidden = !state || state === 'live';
  el.dataset.state = state ?? '';
  el.textContent = state === 'reconnecting'
    ? `Reconnecting${delay ? ` in ${Math.max(1, Math.round(delay / 1000))} s` : ''}…`
    : state ?? '';
}

function setDrawer(open) {
  $('#shell').classList.toggle('drawer-open', open);
  $('#menu').setAttribute('aria-expanded', String(open));
}

function toast(text) {
  let box = $('#toasts');
  if (!box) {
    box = h('div', { id: 'toasts', class: 'toasts', role: 'status' });
    document.body.append(box);
  }
  const t = h('div', { class: 'toast', text });
  box.append(t);
  setTimeout(() => t.remove(), 5000);
}

function start(me) {
  $('#boot').hidden = true;
  $('#shell').hidden = false;
  $('#nav-admin').hidden = !me.is_admin;
  const who = me.key_id ? `Key ${me.key_id.slice(0, 8)}${me.is_admin ? ' · admin' : ''}` : 'Local user (no key needed)';
  $('#whoami').textContent = who;
  $('#signout').hidden = !getKey();
  const sidebar = new Sidebar({
    onDeleted: (id) => {
      if (app.chat.id === id) location.hash = '#/new';
    },
  });
  const ws = new Ws();
  app = {
    me, sidebar, ws,
    chat: new Chat({ sidebar, setTitle, setConn }),
    tasks: new Tasks({ ws, me }),
    admin: new Admin({ me }),
  };
  sidebar.load();
  app.chat.loadAgents();
  route();
}

function route() {
  if (!app) return;
  const parts = location.hash.replace(/^#\/?/, '').split('/');
  const view = parts[0] === 'tasks' || parts[0] === 'admin' ? parts[0] : 'chat';
  for (const [name, el] of Object.entries(views)) el.hidden = name !== view;
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === view) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.body.dataset.view = view;
  setDrawer(false);
  if (view !== 'admin') app.admin.hide();
  if (view === 'chat') {
    if (parts[0] === 'chat' && parts[1]) app.chat.open(decodeURIComponent(parts[1]));
    else app.chat.newDraft();
    return;
  }
  app.chat.close();
  if (view === 'tasks') {
    setTitle('Tasks');
    app.tasks.show();
  } else {
    setTitle('Admin');
    app.admin.show();
  }
}

window.addEventListener('hashchange', route);
window.addEventListener('sluice:toast', (e) => toast(e.detail));
window.addEventListener('sluice:renamed', (e) => app?.chat.renamed(e.detail));
// The key was revoked while the page was open: start over at the sign-in form (a reload
// drops every stream and timer of the old key at once).
window.addEventListener('sluice:unauthorized', () => {
  if (!app) return;
  app = null;
  setKey('');
  sessionStorage.setItem(SIGNIN_NOTE, 'Your API key is no longer accepted. Sign in again.');
  location.reload();
});

$('#menu').addEventListener('click', () => setDrawer(!$('#shell').classList.contains('drawer-open')));
$('#backdrop').addEventListener('click', () => setDrawer(false));
$('#signout').addEventListener('click', () => {
  setKey('');
  location.hash = '';
  location.reload();
});

document.addEventListener('keydown', (e) => {
  if (e.key !== 'Escape' || !app) return;
  if ($('#shell').classList.contains('drawer-open')) {
    setDrawer(false);
    return;
  }
  if (!views.chat.hidden && app.chat.busy()) {
    e.preventDefault();
    app.chat.stop();
  }
});

(async () => {
  try {
    start(await whoami());
  } catch (e) {
    if (e.status === 401) {
      const note = sessionStorage.getItem(SIGNIN_NOTE);
      sessionStorage.removeItem(SIGNIN_NOTE);
      const hadKey = !!getKey();
      setKey('');
      showSignin(note ?? (hadKey ? 'Your saved key is no longer accepted. Sign in again.' : null));
    }
    else {
      $('#boot').textContent = `${plainError(e).title} Reload the page to try again.`;
    }
  }
})();
