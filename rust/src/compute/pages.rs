//! Large zeroed buffers on transparent huge pages: where the weights are streamed from, and
//! the buffer the read-bandwidth yardstick reads (so both see the same pages).
//!
//! Decode reads every weight once per token, and 2 MiB pages read faster than 4 KiB ones:
//! 2 threads reading 1 GiB on the development VM gave 27-31 GB/s with 4 KiB pages and
//! 32-34 GB/s with huge pages (fewer TLB misses along the stream). Linux backs an anonymous
//! map with huge pages when asked (`MADV_HUGEPAGE`) in its default `madvise` THP mode; a hint,
//! ignored where unsupported.

use memmap2::MmapMut;

/// A page-aligned map of `len` zero bytes (at least one), advised for huge pages. Panics
/// when the OS refuses the memory, as an allocation would.
pub fn huge_zeroed(len: usize) -> MmapMut {
    // An anonymous map cannot be empty.
    let map = MmapMut::map_anon(len.max(1)).unwrap_or_else(|e| panic!("cannot map {len} bytes: {e}"));
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    map
}
