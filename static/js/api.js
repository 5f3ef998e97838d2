// The HTTP API with the stored key. The key lives in localStorage: the user chose to sign
// in on this browser, and it must survive reloads.

const KEY = 'sluice.apiKey';

export const getKey = () => localStorage.getItem(KEY) ?? '';
export function setKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

export function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/** Raw call: `{status, data}` for any status, for views that show non-2xx bodies. */
export async function apiRaw(path, { method = 'GET', body, signal } = {}) {
  const headers = authHeaders(body === undefined ? {} : { 'Content-Type': 'application/json' });
  let resp;
  try {
    resp = await fetch(path, {
      method, headers, signal, cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'The server could not be reached.');
  }
  const text = resp.status === 204 ? '' : await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // Not JSON: a proxy's error page, say. The status still tells what happened.
  }
  return { status: resp.status, data, headers: resp.headers };
}

export async function api(path, opts) {
  const r = await apiRaw(path, opts);
  if (r.status >= 200 && r.status < 300) return r.data;
  throw toError(r.status, r.data, r.headers);
}

export function toError(status, data, headers) {
  const e = data?.error ?? {};
  const retryAfter = Number(headers?.get('Retry-After')) || undefined;
  const err = new ApiError(status, e.code || `http_${status}`, e.message || `HTTP ${status}`, retryAfter);
  if (status === 401) window.dispatchEvent(new CustomEvent('sluice:unauthorized', { detail: err }));
  return err;
}
