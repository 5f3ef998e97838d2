//! Anthropic's Messages API: requests in, events and messages out.
//!
//! A request becomes a [`ChatRequest`] in OpenAI's chat shape, which every provider kind
//! reads; the relayed [`Chunk`]s become Anthropic's stream events through one [`Encoder`],
//! and a non-streamed reply is those same events folded into a message ([`MessageBuilder`]),
//! so both forms always agree. docs/anthropic-messages.md has the mapping.

mod events;
mod request;

pub use events::{Encoder, Event, MessageBuilder, error_body, error_type};
pub use request::{Request, to_chat};

#[cfg(test)]
mod tests;
