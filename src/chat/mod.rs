//! The chat services: sessions and their generations (`service`), `/v1/chat/completions`
//! (`completions`), agents, and single-flight of identical requests.

pub mod agent;
pub mod completions;
pub mod flight;
pub mod responses;
pub mod service;

#[cfg(test)]
mod mock_replies;
