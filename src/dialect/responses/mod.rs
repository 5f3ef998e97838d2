//! OpenAI's Responses API: requests in, events and response objects out.
//!
//! A request becomes a [`ChatRequest`](crate::domain::ChatRequest) ([`to_chat`]), so any
//! upstream serves it through the one relay; the relayed chunks become the API's streaming
//! events and the response object they add up to ([`ResponseBuilder`]).

mod events;
mod request;

pub use events::{ResponseBuilder, ResponseEvent, ResponseShell, shell};
pub use request::{CreateResponse, Input, Reasoning, TextConfig, new_id, to_chat};

#[cfg(test)]
mod tests;
