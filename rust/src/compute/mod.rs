//! The compute layer: a spinning fork-join pool, weight matrices and their products, and the
//! element-wise ops of a transformer block.

pub mod attention;
pub mod bandwidth;
pub mod fastmath;
pub mod matmul;
pub mod ops;
pub mod pages;
pub mod pool;

pub use matmul::{ActRows, ActRowsMut, QMatrix};
pub use pool::{Ctx, SharedMut, ThreadPool};
