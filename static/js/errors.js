// Error codes (HTTP and in-band stream errors) in plain words, and whether retrying can help.

const WORDS = {
  network: 'Cannot reach the sluice server. Check the connection.',
  invalid_api_key: 'Your API key was not accepted. Sign in again.',
  forbidden: 'This needs an admin key.',
  not_found: 'Not found. It may have been deleted.',
  generation_running: 'A reply is still being written in this chat. Wait for it, or press Stop.',
  upstream_rate_limited: 'The model provider is limiting requests right now.',
  rate_limited: 'Too many requests from this key right now.',
  quota_exceeded: "This key's quota for the current minute is used up.",
  quota_unavailable: 'The quota service is unavailable.',
  too_many_streams: 'Too many replies are streaming at once right now.',
  unavailable: 'The server is unavailable for a moment.',
  draining: 'The server is restarting.',
  server_shutting_down: 'The server shut down before the reply was finished.',
  store_unavailable: "The server's database is unavailable.",
  queue_full: 'Too many tasks are waiting already.',
  queue_unavailable: 'The task queue is unavailable.',
  upstream_error: 'The model provider returned an error.',
  upstream_unreachable: 'The model provider could not be reached.',
  upstream_rejected: "The model provider refused sluice's credentials.",
  upstream_disconnected: 'The connection to the model provider broke in the middle of the reply.',
  upstream_malformed: 'The model provider sent something sluice could not read.',
  first_token_timeout: 'The model took too long to start answering.',
  idle_timeout: 'The model stopped sending text partway through.',
  total_timeout: 'The reply took longer than the server allows.',
  interrupted: 'The reply was cut off: the server writing it stopped.',
  model_not_found: 'No provider serves the model of this agent.',
  payload_too_large: 'The message is too long.',
  invalid_request: 'The server did not accept this request.',
  failed: 'The reply failed.',
};

const FINAL = new Set([
  'invalid_api_key', 'forbidden', 'not_found', 'model_not_found', 'payload_too_large',
  'invalid_request', 'invalid_json', 'upstream_rejected',
]);

function byStatus(status) {
  if (status === 429) return 'Too many requests right now.';
  if (status === 503) return 'The server is busy.';
  if (status === 502) return 'The model provider failed.';
  if (status === 504) return 'The model took too long to answer.';
  if (status >= 500) return 'The server ran into a problem.';
  return null;
}

/** `e`: an ApiError or an in-band `{code, message}`. → `{title, detail, retryable}` */
export function plainError(e) {
  const code = e?.code ?? '';
  let title = WORDS[code] ?? (code.startsWith('upstream') ? WORDS.upstream_error : null)
    ?? byStatus(e?.status) ?? 'Something went wrong.';
  const retryable = !FINAL.has(code) && !(e?.status >= 400 && e?.status < 429 && e?.status !== 409);
  if (e?.retryAfter) title += ` Try again in ${e.retryAfter} s.`;
  else if (retryable && code !== 'generation_running') title += ' You can try again.';
  const detail = e?.message && e.message !== title ? e.message : '';
  return { title, detail, retryable, code };
}
