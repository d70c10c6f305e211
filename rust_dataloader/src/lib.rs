//! ncp_dataloader: preference pairs (Pick-a-Pic parquet or JSONL) decoded,
//! resized, cropped and batched in parallel outside the GIL. The latent cache
//! (written and read in Python, `ncp.data.cache`) uses its order and draws.
//!
//! Order comes from indices, never from threads: a permutation per (seed,
//! epoch), split by rank; augmentation per (seed, epoch, pair index); batches
//! delivered in order whatever the thread count.
//!
//! Modules: `source` (sources and the pair index), `selection` (which rows become
//! pairs), `row_cache` (row groups kept in memory), `decode` (image decoding that
//! refuses what Pillow refuses), `imaging` (resize, crop, flip), `batch` (epoch
//! plans and batch assembly), `loader` (prefetch, position, resume, stats: the
//! core, tested by `cargo test`), `python` (the PyO3 binding only, behind the
//! `python` feature).
pub mod batch;
pub mod decode;
pub mod error;
pub mod imaging;
pub mod loader;
pub mod rng;
pub mod row_cache;
pub mod selection;
pub mod source;

#[cfg(feature = "python")]
mod python;
