//! The span protocol, both halves: the End node's call to run hidden states through one hop
//! ([`client`]) and the worker that answers it ([`server`]). Frames are `wire`'s; `net`
//! carries them.

pub mod backend;
mod batcher;
pub mod client;
mod server;

#[cfg(test)]
mod client_tests;
#[cfg(test)]
mod server_tests;

pub use client::{forward, forward_chain, ChainHop, ChainOutcome, Hop};
pub use backend::{CpuSpan, SpanBackend};
pub use server::{SessionLimits, SpanHandler};
