// The Admin view: liveness and readiness, a live metrics summary, running streams and the
// response cache. Polls every 2 s while visible. An endpoint this server does not have
// (404) is shown as "not available" instead of breaking the page.

import { apiRaw } from './api.js';
import { $, fmtMs, fmtUptime, h } from './dom.js';
import { plainError } from './errors.js';

const POLL_MS = 2000;

const METRICS = [
  ['total_requests', 'Requests', (v) => v.toLocaleString()],
  ['concurrent_requests', 'In flight', String],
  ['active_streams', 'Active streams', String],
  ['tokens_streamed', 'Tokens streamed', (v) => v.toLocaleString()],
  ['ttft_p95_ms', 'TTFT p95', fmtMs],
  ['average_response_time_ms', 'Avg response', fmtMs],
  ['cache_hit_rate', 'Cache hit rate', (v) => `${(v * (v <= 1 ? 100 : 1)).toFixed(1)} %`],
  ['cache_size', 'Cache entries', (v) => v.toLocaleString()],
  ['rate_limited_requests', 'Rate limited', (v) => v.toLocaleString()],
  ['upstream_errors', 'Upstream errors', (v) => (typeof v === 'object' ? Object.values(v).reduce((a, b) => a + b, 0) : v).toLocaleString()],
];

function unavailable(what) {
  return h('p', { class: 'muted unavailable', text: `This server does not provide ${what} yet.` });
}

function failure(r) {
  if (r.status === 404) return null;
  const e = r.data?.error ?? {};
  return h('p', { class: 'form-error', text: plainError({ status: r.status, code: e.code, message: e.message }).title });
}

function dl(pairs) {
  return h('dl', { class: 'kv' }, pairs.flatMap(([k, v]) => [h('dt', { text: k }), h('dd', null, v)]));
}

const label = (k) => k.charAt(0).toUpperCase() + k.slice(1).replaceAll('_', ' ');

/** A readiness entry: a dependency `{backend, ok, latency_ms, error}`, a list of providers
 * `{name, circuit}`, or anything else as text. */
function value(v) {
  if (Array.isArray(v)) {
    if (!v.length) return '–';
    return h('ul', { class: 'plain' }, v.map((x) => h('li', null, typeof x === 'object' && x
      ? [x.name ?? '', ' ', x.circuit ? circuit(x.circuit) : JSON.stringify(x)]
      : String(x))));
  }
  if (v && typeof v === 'object') {
    const bits = [v.backend, v.latency_ms != null ? fmtMs(v.latency_ms) : null, v.error].filter(Boolean).join(' · ');
    return h('span', null, v.ok != null ? badge(v.ok, 'ok', 'down') : null, ' ', bits);
  }
  return String(v);
}

function circuit(state) {
  const cls = { closed: 'ok', half_open: 'warn', open: 'bad' }[state] ?? '';
  return h('span', { class: `badge ${cls}`, text: state === 'closed' ? 'healthy' : state.replace('_', '-') });
}

function badge(ok, yes, no) {
  return h('span', { class: `badge ${ok ? 'ok' : 'bad'}`, text: ok ? yes : no });
}

export class Admin {
  constructor({ me }) {
    this.me = me;
    this.view = $('#view-admin');
    this.timer = null;
  }

  show() {
    this.hide();
    if (!this.me.is_admin) {
      this.view.replaceChildren(h('div', { class: 'page' }, h('div', { class: 'card refused', id: 'admin-refused' },
        h('h2', { text: 'Admin only' }),
        h('p', { text: 'The admin view needs an admin key. You are signed in with a user key.' }),
        h('p', { class: 'muted', text: 'An operator creates one with: sluice keys create --name ops --admin' }))));
      return;
    }
    this.cards = {
      health: h('section', { class: 'card', id: 'admin-health' }, h('h2', { text: 'Health' })),
      ready: h('section', { class: 'card', id: 'admin-ready' }, h('h2', { text: 'Readiness' })),
      cache: this.cacheCard(),
      metrics: h('section', { class: 'card wide', id: 'admin-metrics' }, h('h2', { text: 'Metrics' })),
      streams: h('section', { class: 'card wide', id: 'admin-streams' }, h('h2', { text: 'Running streams' })),
    };
    this.view.replaceChildren(h('div', { class: 'page admin-grid' }, Object.values(this.cards)));
    this.poll();
  }

  hide() {
    clearTimeout(this.timer);
    this.timer = null;
    this.gen = (this.gen ?? 0) + 1;
  }

  async poll() {
    const gen = this.gen;
    const [health, ready, metrics, streams] = await Promise.all(
      ['/health', '/health/ready', '/api/metrics', '/api/admin/streams'].map((p) => apiRaw(p).catch((e) => ({ status: 0, error: e }))),
    );
    if (gen !== this.gen) return;
    this.fill(this.cards.health, this.healthBody(health));
    this.fill(this.cards.ready, this.readyBody(ready));
    this.fill(this.cards.metrics, this.metricsBody(metrics));
    this.fill(this.cards.streams, this.streamsBody(streams));
    this.timer = setTimeout(() => this.poll(), POLL_MS);
  }

  fill(card, body) {
    card.replaceChildren(card.firstChild, ...[body].flat().filter(Boolean));
  }

  healthBody(r) {
    if (r.status === 0) return h('p', { class: 'form-error', text: plainError({ code: 'network' }).title });
    if (r.status === 404) return unavailable('a health check');
    const d = r.data ?? {};
    return dl([
      ['Status', badge(d.status === 'ok', 'ok', d.status ?? `HTTP ${r.status}`)],
      ['Server', d.server_id ?? '–'],
      ['Version', d.version ?? '–'],
      ['Uptime', fmtUptime(d.uptime_s)],
    ]);
  }

  readyBody(r) {
    if (r.status === 0) return null;
    if (r.status === 404) return unavailable('a readiness check');
    const d = r.data ?? {};
    const rows = [['Ready', badge(r.status === 200 && d.ready !== false, 'ready', 'not ready')]];
    if (d.draining != null) rows.push(['Draining', d.draining ? 'yes' : 'no']);
    for (const [k, v] of Object.entries(d)) {
      if (k === 'ready' || k === 'draining') continue;
      rows.push([label(k), value(v)]);
    }
    return dl(rows);
  }

  metricsBody(r) {
    if (r.status === 404) return unavailable('a metrics summary');
    if (r.status !== 200) return failure(r);
    const d = r.data ?? {};
    const tiles = METRICS.filter(([k]) => d[k] != null).map(([k, name, fmt]) => h('div', { class: 'tile', dataset: { metric: k } },
      h('span', { class: 'tile-value', text: fmt(d[k]) }), h('span', { class: 'tile-label', text: name })));
    // Upstream errors come per provider and kind: the breakdown is the useful part.
    const errors = d.upstream_errors && typeof d.upstream_errors === 'object' ? Object.entries(d.upstream_errors) : [];
    const breakdown = errors.length
      ? h('p', { class: 'muted', text: `Upstream errors: ${errors.map(([k, n]) => `${k} ${n}`).join(', ')}` })
      : null;
    return [h('div', { class: 'tiles' }, tiles), breakdown, d.server_id ? h('p', { class: 'muted', text: `Reported by ${d.server_id}` }) : null];
  }

  streamsBody(r) {
    if (r.status === 404) return unavailable('a list of running streams');
    if (r.status !== 200) return failure(r);
    const rows = r.data?.data ?? [];
    if (!rows.length) return h('p', { class: 'muted', text: 'No replies are streaming right now.' });
    const short = (s) => (s ? `${String(s).slice(0, 8)}…` : '–');
    return h('div', { class: 'table-wrap' }, h('table', { class: 'streams' },
      h('thead', null, h('tr', null, ['Generation', 'Session', 'Owner', 'Instance', 'Age', 'Tokens', 'Watchers'].map((t) => h('th', { text: t })))),
      h('tbody', null, rows.map((s) => h('tr', null,
        h('td', { title: s.generation_id, text: short(s.generation_id) }),
        h('td', { title: s.session_id, text: short(s.session_id) }),
        h('td', { text: s.owner ?? '–' }),
        h('td', { text: s.instance ?? '–' }),
        h('td', { text: fmtUptime(s.age_s) }),
        h('td', { text: String(s.tokens ?? '–') }),
        h('td', { text: String(s.subscribers ?? '–') }))))));
  }

  cacheCard() {
    const prefix = h('input', { id: 'cache-prefix', placeholder: 'all entries', 'aria-label': 'Key prefix (optional)' });
    const out = h('p', { class: 'muted', role: 'status' });
    const button = h('button', { type: 'submit', class: 'danger', id: 'cache-clear', text: 'Clear cache' });
    const form = h('form', { class: 'card', id: 'admin-cache' },
      h('h2', { text: 'Response cache' }),
      h('label', { for: 'cache-prefix', text: 'Key prefix (optional)' }),
      h('div', { class: 'inline' }, prefix, button), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      button.disabled = true;
      const body = prefix.value.trim() ? { prefix: prefix.value.trim() } : {};
      try {
        const r = await apiRaw('/api/admin/cache/clear', { method: 'POST', body });
        if (r.status === 404) out.textContent = 'This server has no cache to clear yet.';
        else if (r.status >= 400) out.textContent = plainError({ status: r.status, ...(r.data?.error ?? {}) }).title;
        else out.textContent = `Cleared ${r.data?.cleared ?? 0} entries.`;
      } catch (err) {
        out.textContent = plainError(err).title;
      }
      button.disabled = false;
    });
    return form;
  }
}
