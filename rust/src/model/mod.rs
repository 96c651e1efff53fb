//! CPU forward passes of model spans (a contiguous range of transformer layers), and the
//! End model's pieces that live in Rust: token embedding and output head.

pub mod decoder;
pub mod head;
pub mod kv_cache;
pub mod moe;
pub mod weights;

pub use decoder::{DecoderConfig, DecoderSpan, SeqChunk};
pub use head::{OutputHead, PerLayerInputs, TokenEmbedding};
pub use kv_cache::{KvCache, KvDtype, KvLayout, Slot};
pub use moe::MoeConfig;

#[cfg(test)]
pub(crate) mod tests;
