//! CPU forward passes of model spans (a contiguous range of transformer layers), and the
//! End model's pieces that live in Rust: token embedding and output head.

pub mod head;
pub mod kv_cache;
pub mod llama;
pub mod weights;

pub use head::{OutputHead, TokenEmbedding};
pub use kv_cache::{KvCache, KvDtype};
pub use llama::{LlamaConfig, LlamaSpan, SeqChunk};

#[cfg(test)]
pub(crate) mod tests;
