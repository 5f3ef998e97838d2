// The Vercel AI SDK against sluice: `createOpenAI({baseURL})(model)`, the provider's default
// call, speaks the Responses API (`POST /v1/responses`). `streamText` and `generateText` must
// each get the whole reply. Run by tests/it/vercel.rs with SLUICE_BASE_URL, SLUICE_API_KEY
// and EXPECTED_TEXT (what the mock answers); not a `node --test` file of its own.
import assert from 'node:assert/strict';
import { createOpenAI } from '@ai-sdk/openai';
import { generateText, streamText } from 'ai';

const openai = createOpenAI({
  baseURL: process.env.SLUICE_BASE_URL,
  apiKey: process.env.SLUICE_API_KEY,
});
const model = openai(process.env.MODEL ?? 'mock-model');
const expected = process.env.EXPECTED_TEXT;
const prompt = 'Say something plain.';

const errors = [];
const stream = streamText({ model, prompt, maxRetries: 0, onError: ({ error }) => errors.push(error) });
let streamed = '';
let parts = 0;
for await (const delta of stream.textStream) {
  streamed += delta;
  parts += 1;
}
assert.deepEqual(errors, []);
assert.equal(streamed, expected);
assert.ok(parts > 1, `the text arrived in ${parts} part(s), not streamed`);
assert.equal(await stream.finishReason, 'stop');
const usage = await stream.usage;
assert.ok(usage.outputTokens > 0, JSON.stringify(usage));

const whole = await generateText({ model, prompt, maxRetries: 0 });
assert.equal(whole.text, expected);
assert.equal(whole.finishReason, 'stop');

console.log(`vercel-ai: streamText ${parts} parts, generateText ${whole.text.length} chars: ok`);
