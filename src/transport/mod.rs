//! Adapters between client sockets and the relay: each turns upstream events into one
//! wire format.

pub mod events;
pub mod messages;
pub mod openai;
pub mod responses;
pub mod sse;
pub mod ws;
