//! Client dialects: the other APIs clients speak to sluice, translated to and from the
//! domain types, so every one of them rides the same relay as `/v1/chat/completions`.
//!
//! - [`responses`]: OpenAI's Responses API (`/v1/responses`).
//! - [`messages`]: Anthropic's Messages API (`/v1/messages`).
//!
//! Nothing here does I/O: requests become a [`ChatRequest`](crate::domain::ChatRequest),
//! and relayed [`Chunk`](crate::domain::Chunk)s become the dialect's events and objects.

pub mod messages;
pub mod responses;
