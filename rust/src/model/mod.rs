//! CPU forward passes of model spans (a contiguous range of transformer layers), and the
//! End model's pieces that live in Rust: token embedding and output head.

pub mod head;
pub mod kv_cache;
pub mod moe;
pub mod decoder;
pub mod weights;

pub use head::{OutputHead, TokenEmbedding};
pub use kv_cache::{KvCache, KvDtype};
pub use moe::MoeConfig;
pub use decoder::{DecoderConfig, DecoderSpan, SeqChunk};

#[cfg(test)]
pub(crate) mod tests;
