// Server-Sent Events over fetch(). EventSource cannot send an Authorization header, so the
// UI reads the stream itself: the same framing rules, with the key and Last-Event-ID as
// headers, and its own reconnect policy.

import { ApiError, authHeaders, toError } from './api.js';
import { sleep } from './dom.js';

/** Yields `{id, event, data}` for each event of an SSE body; comments are skipped. */
export async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  let data = [];
  let event = '';
  let id = null;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      for (;;) {
        const nl = buf.search(/\r\n|\r|\n/);
        if (nl < 0) break;
        // A trailing \r may be the first half of \r\n: wait for the next chunk.
        if (buf[nl] === '\r' && nl === buf.length - 1) break;
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf.startsWith('\r\n', nl) ? 2 : 1));
        if (line === '') {
          if (data.length) yield { id, event: event || 'message', data: data.join('\n') };
          data = [];
          event = '';
          id = null;
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'data') data.push(val);
        else if (field === 'event') event = val;
        else if (field === 'id') id = val;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * Exponential backoff with "equal jitter": between half and all of min(cap, base·2^n), so a
 * server restart is not met by every tab reconnecting in the same instant.
 */
export function backoff(attempt, base = 500, cap = 15000) {
  const ceiling = Math.min(cap, base * 2 ** attempt);
  return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
}

/**
 * Follows an SSE endpoint for as long as it is wanted: reconnects after a drop (with the
 * last event id, so nothing is missed or repeated), backs off with jitter, reconnects at
 * once when the browser comes back online, and gives up only on 401/403/404.
 *
 * `onOpen` runs once per connection, after the response head and before its first event
 * is handled (the chat loads its history there, race-free).
 */
export class Follower {
  constructor({ url, lastEventId = null, onEvent, onOpen, onStatus }) {
    Object.assign(this, { url, lastEventId, onEvent, onOpen, onStatus });
    this.stopped = false;
    this.wake = new AbortController();
    this.skipWait = false;
    this.online = () => {
      this.skipWait = true;
      this.wake.abort();
    };
    window.addEventListener('online', this.online);
  }

  start() {
    this.loop();
    return this;
  }

  stop() {
    this.stopped = true;
    this.conn?.abort();
    this.wake.abort();
    window.removeEventListener('online', this.online);
  }

  /** Drops the current connection; the loop resumes at once from the last event id. */
  reconnect() {
    this.skipWait = true;
    this.conn?.abort();
  }

  async loop() {
    let attempt = 0;
    while (!this.stopped) {
      this.conn = new AbortController();
      try {
        const headers = authHeaders({ Accept: 'text/event-stream' });
        if (this.lastEventId) headers['Last-Event-ID'] = this.lastEventId;
        const resp = await fetch(this.url, { headers, signal: this.conn.signal, cache: 'no-store' });
        if (!resp.ok) {
          const text = await resp.text();
          let data = null;
          try { data = JSON.parse(text); } catch { /* not JSON */ }
          throw toError(resp.status, data, resp.headers);
        }
        this.onStatus?.('live');
        await this.onOpen?.();
        for await (const ev of sseEvents(resp.body)) {
          if (this.stopped) return;
          if (ev.id) {
            this.lastEventId = ev.id;
            attempt = 0;
          }
          this.onEvent(ev);
        }
      } catch (e) {
        if (this.stopped) return;
        if (e instanceof ApiError && [401, 403, 404].includes(e.status)) {
          this.onStatus?.('closed', e);
          return;
        }
      }
      if (this.stopped) return;
      // A clean end (the server drained, or this client lagged) or a drop: come back.
      const delay = backoff(attempt++);
      this.onStatus?.('reconnecting', delay);
      if (!this.skipWait) {
        this.wake = new AbortController();
        await sleep(delay, this.wake.signal);
      }
      this.skipWait = false;
    }
  }
}
