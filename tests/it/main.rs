//! The integration tests, one binary: a test is `it::<file>::<name>`, run one with
//! `cargo test --test it -- <file>::<name>`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)] // tests fail loudly by design

mod common;

mod access;
mod cluster;
mod deploy;
mod docs;
mod first_hour_auth;
mod guards;
mod inproc;
mod layers;
mod limits;
mod logging;
mod messages;
mod openai_stream;
mod ops;
mod process;
mod provider_slots;
mod redis_queue;
mod responses;
mod sdk;
mod sessions;
mod start;
mod store;
mod store_faults;
mod tasks;
mod timeouts;
mod ui;
mod upstream_limits;
mod vercel;
mod ws;
