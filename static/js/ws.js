// One WebSocket for the page, carrying any number of topics (task progress). Browsers
// cannot set headers on a WebSocket, so it authenticates with a short-lived token from
// POST /api/ws-token. It reconnects with backoff and jitter, and resubscribes every
// topic with the id of the last event it got, so nothing is missed or repeated.

import { api } from './api.js';
import { backoff } from './sse.js';

/** The server closes peers silent for 60 s; an app-level ping keeps an idle tab open. */
const PING_MS = 20000;

export class Ws {
  constructor() {
    this.topics = new Map(); // topic → {handler, lastId}
    this.sock = null;
    this.connecting = false;
    this.attempt = 0;
    this.timer = null;
    this.listeners = new Set();
    this.status = 'idle';
  }

  onStatus(fn) {
    this.listeners.add(fn);
    fn(this.status);
    return () => this.listeners.delete(fn);
  }

  setStatus(s) {
    this.status = s;
    for (const fn of this.listeners) fn(s);
  }

  subscribe(topic, handler, lastId = null) {
    this.topics.set(topic, { handler, lastId });
    if (this.sock?.readyState === WebSocket.OPEN) this.sendSubscribe(topic);
    else this.connect();
  }

  unsubscribe(topic) {
    if (!this.topics.delete(topic)) return;
    this.send({ op: 'unsubscribe', topic });
    // Nothing left to follow: no reason to hold a connection (and its pings) open.
    if (!this.topics.size) this.sock?.close(1000);
  }

  send(frame) {
    if (this.sock?.readyState === WebSocket.OPEN) this.sock.send(JSON.stringify(frame));
  }

  sendSubscribe(topic) {
    const t = this.topics.get(topic);
    const frame = { op: 'subscribe', topic };
    if (t?.lastId) frame.last_event_id = t.lastId;
    this.send(frame);
  }

  async connect() {
    if (this.sock || this.connecting || this.timer) return;
    this.connecting = true;
    this.setStatus('connecting');
    try {
      const { token } = await api('/api/ws-token', { method: 'POST' });
      const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
      const sock = new WebSocket(`${scheme}://${location.host}/ws?token=${encodeURIComponent(token)}`);
      this.sock = sock;
      sock.onopen = () => {
        this.attempt = 0;
        this.setStatus('live');
        for (const topic of this.topics.keys()) this.sendSubscribe(topic);
        this.ping = setInterval(() => this.send({ op: 'ping' }), PING_MS);
      };
      sock.onmessage = (m) => this.receive(m.data);
      sock.onclose = () => {
        clearInterval(this.ping);
        this.sock = null;
        this.retry();
      };
    } catch {
      this.retry();
    } finally {
      this.connecting = false;
    }
  }

  retry() {
    if (!this.topics.size) {
      this.setStatus('idle');
      return;
    }
    const delay = backoff(this.attempt++);
    this.setStatus('reconnecting');
    this.timer = setTimeout(() => {
      this.timer = null;
      this.connect();
    }, delay);
  }

  receive(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    if (f.op === 'pong') return;
    const t = this.topics.get(f.topic);
    if (!t) return;
    if (f.op === 'error') {
      if (f.code !== 'already_subscribed') t.handler({ event: 'ws_error', data: f });
      return;
    }
    if (f.id) t.lastId = f.id;
    t.handler(f);
  }
}
