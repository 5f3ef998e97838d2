//! sluice: a streaming LLM chat server.
#![forbid(unsafe_code)]

pub mod cache;
pub mod chat;
pub mod cluster;
pub mod config;
pub mod dialect;
pub mod domain;
pub mod error;
pub mod guard;
pub mod http;
pub mod hub;
pub mod ops;
pub mod queue;
pub mod server;
pub mod state;
pub mod store;
pub mod tasks;
pub mod transport;
pub mod upstream;
