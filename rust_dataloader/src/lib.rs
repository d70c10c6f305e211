//! ncp_dataloader: preference pairs (Pick-a-Pic parquet or JSONL) decoded,
//! resized, cropped and batched in parallel outside the GIL, and the reader of
//! the latent cache written by `python -m ncp.cache`.
//!
//! Order comes from indices, never from threads: a permutation per (seed,
//! epoch), split by rank; augmentation per (seed, epoch, pair index); batches
//! delivered in order whatever the thread count.
pub mod batch;
pub mod error;
pub mod imaging;
pub mod rng;
pub mod source;

#[cfg(feature = "python")]
mod python;
