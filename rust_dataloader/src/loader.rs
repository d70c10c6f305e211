//! The loader core, without Python: the pair index, the thread pool and the
//! prefetch of batches, the position (epoch, batch) with its resume rules, and the
//! run statistics. `python.rs` only converts its arguments and results.
//!
//! The loader owns the epoch counter: handing out an epoch's last batch moves it to
//! the next epoch's start, so a consumer only iterates, pass after pass.
use crate::batch::{build_batch, epoch_samples, num_batches, Batch, Config};
use crate::columns::{Columns, Format};
use crate::error::{LoadError, Result};
use crate::index::{build_index, IndexStats, ItemIndex};
use crate::row_cache::RowGroupCache;
use crate::selection::Selection;
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How many skipped images are kept, with file and row, for `stats()`.
pub const MAX_SKIP_RECORDS: usize = 1000;

/// The message of a caught panic.
pub fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Run `f`, turning a panic into LoadError::Internal.
pub fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(LoadError::Internal(panic_message(p))))
}

/// What the loader needs besides the batch `Config`.
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    /// Pairs, or unpaired images with binary labels.
    pub format: Format,
    pub columns: Vec<(String, String)>,
    pub selection: Selection,
    /// Decoding threads (0: all cores).
    pub num_threads: usize,
    /// Batches in flight.
    pub prefetch: usize,
    /// Bytes of whole row groups kept in memory (0: off).
    pub row_group_cache_bytes: usize,
}

/// Where the next batch comes from, with the order keys that a resume must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub epoch: u64,
    pub sample_in_epoch: usize,
    pub seed: u64,
    pub world_size: usize,
    pub rank: usize,
    pub batch_size: usize,
}

impl State {
    /// The fields by name: the keys of `ncp.data.sources.DataState`.
    pub fn entries(&self) -> [(&'static str, u64); 6] {
        [
            ("epoch", self.epoch),
            ("sample_in_epoch", self.sample_in_epoch as u64),
            ("seed", self.seed),
            ("world_size", self.world_size as u64),
            ("rank", self.rank as u64),
            ("batch_size", self.batch_size as u64),
        ]
    }
}

/// One value of `Loader::stats`.
#[derive(Debug, Clone, PartialEq)]
pub enum Stat {
    Count(u64),
    Seconds(f64),
    Text(&'static str),
    Records(Vec<String>),
}

/// Counts of what iteration has yielded and skipped.
#[derive(Debug, Default, Clone)]
pub struct RunStats {
    pub batches: u64,
    pub pairs: u64,
    pub skipped: u64,
    /// "file row N column C: why", at most MAX_SKIP_RECORDS.
    pub records: Vec<String>,
    pub read_ns: u64,
    pub decode_ns: u64,
}

struct Core {
    index: ItemIndex,
    /// Whole row groups' image columns kept between batches (budget 0: off).
    row_groups: RowGroupCache,
    cfg: Config,
    pool: rayon::ThreadPool,
    prefetch: usize,
}

/// Where the next batch comes from; `generation` tells the live iterator that it was moved.
#[derive(Clone, Copy)]
struct Position {
    epoch: u64,
    batch: usize,
    generation: u64,
}

/// Preference pairs in batches, epoch after epoch (see the module docs).
pub struct Loader {
    core: Arc<Core>,
    pos: Arc<Mutex<Position>>,
    stats: Arc<Mutex<RunStats>>,
}

impl Loader {
    /// Index `sources` (paths, globs, folders, JSONL) and start the threads; epoch 0, batch 0.
    pub fn new(sources: &[String], cfg: Config, opts: LoaderOptions) -> Result<Self> {
        cfg.validate()?;
        let mut overrides = opts.columns.clone();
        overrides.sort();
        let cols = Columns::for_format(opts.format, &overrides)?;
        let threads = if opts.num_threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            opts.num_threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ncp-loader-{i}"))
            .build()
            .map_err(|e| LoadError::Internal(format!("cannot start loader threads: {e}")))?;
        let index = pool.install(|| guarded(|| build_index(sources, cols, opts.selection)))?;
        let row_groups = RowGroupCache::new(opts.row_group_cache_bytes, &index);
        let core = Core { index, row_groups, cfg, pool, prefetch: opts.prefetch.max(1) };
        Ok(Loader {
            core: Arc::new(core),
            pos: Arc::new(Mutex::new(Position { epoch: 0, batch: 0, generation: 0 })),
            stats: Arc::default(),
        })
    }

    /// Batches per epoch on this rank.
    pub fn len(&self) -> usize {
        num_batches(self.core.index.items.len(), &self.core.cfg)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Items in the index (all ranks, after selection): pairs, or unpaired images.
    pub fn num_pairs(&self) -> usize {
        self.core.index.items.len()
    }

    pub fn config(&self) -> &Config {
        &self.core.cfg
    }

    pub fn index_stats(&self) -> &IndexStats {
        &self.core.index.stats
    }

    pub fn index(&self) -> &ItemIndex {
        &self.core.index
    }

    pub fn num_threads(&self) -> usize {
        self.core.pool.current_num_threads()
    }

    pub fn run_stats(&self) -> RunStats {
        self.stats.lock().unwrap().clone()
    }

    /// Pairs, or unpaired images.
    pub fn format(&self) -> Format {
        self.core.index.columns.format
    }

    /// Everything `stats()` reports, by name: the index counts (with the desirable and undesirable counts
    /// for unpaired data), what iteration has yielded and skipped (with file and row), the threads, the
    /// time spent reading and decoding, and the row-group cache.
    pub fn stats(&self) -> Vec<(&'static str, Stat)> {
        use Stat::{Count, Records, Seconds, Text};
        let i = self.index_stats();
        let s = self.run_stats();
        let rgc = &self.core.row_groups;
        let n = |v: usize| Count(v as u64);
        let mut out = vec![
            ("format", Text(self.format().name())),
            ("files", n(i.files)),
            ("rows", n(i.rows)),
            ("ties", n(i.ties)),
            ("dropped_ties", n(i.dropped_ties)),
            ("dropped_not_absolute", n(i.dropped_not_absolute)),
            ("pairs", n(i.pairs)),
        ];
        if self.format() == Format::Unpaired {
            out.extend([("desirable", n(i.desirable)), ("undesirable", n(i.undesirable))]);
        }
        out.extend([
            ("batches_yielded", Count(s.batches)),
            ("pairs_yielded", Count(s.pairs)),
            ("skipped", Count(s.skipped)),
            ("skipped_records", Records(s.records)),
            ("num_threads", n(self.num_threads())),
            ("read_seconds", Seconds(s.read_ns as f64 * 1e-9)),
            ("decode_seconds", Seconds(s.decode_ns as f64 * 1e-9)),
            ("row_group_reads", Count(rgc.reads.load(Ordering::Relaxed))),
            ("row_group_cache_hits", Count(rgc.hits.load(Ordering::Relaxed))),
            ("row_group_cache_bytes", n(rgc.held_bytes())),
            ("row_group_cache_budget", n(rgc.budget())),
        ]);
        out
    }

    /// Start `epoch` from its beginning; a no-op for the current epoch, so that a
    /// resumed position survives a set_epoch of the same epoch.
    pub fn set_epoch(&self, epoch: u64) {
        let mut p = self.pos.lock().unwrap();
        if p.epoch != epoch {
            *p = Position { epoch, batch: 0, generation: p.generation + 1 };
        }
    }

    pub fn state(&self) -> State {
        let p = *self.pos.lock().unwrap();
        let cfg = &self.core.cfg;
        State {
            epoch: p.epoch,
            sample_in_epoch: p.batch * cfg.batch_size,
            seed: cfg.seed,
            world_size: cfg.world_size,
            rank: cfg.rank,
            batch_size: cfg.batch_size,
        }
    }

    /// Continue exactly at (`epoch`, `sample_in_epoch`); `order` holds the keys the saved state has of
    /// seed, world_size and batch_size, each of which must be this loader's (the order would differ).
    pub fn resume(&self, epoch: u64, sample_in_epoch: usize, order: &[(&str, u64)]) -> Result<()> {
        let cfg = &self.core.cfg;
        for &(k, have) in order {
            let want = match k {
                "seed" => cfg.seed,
                "world_size" => cfg.world_size as u64,
                "batch_size" => cfg.batch_size as u64,
                _ => continue,
            };
            if have != want {
                return Err(LoadError::Config(format!(
                    "cannot resume: state has {k}={have} but the loader has {k}={want} (the order would differ)"
                )));
            }
        }
        if !sample_in_epoch.is_multiple_of(cfg.batch_size) {
            return Err(LoadError::Config(format!(
                "cannot resume: sample_in_epoch={sample_in_epoch} is not a multiple of batch_size={}",
                cfg.batch_size
            )));
        }
        let mut p = self.pos.lock().unwrap();
        *p = Position { epoch, batch: sample_in_epoch / cfg.batch_size, generation: p.generation + 1 };
        Ok(())
    }

    /// The rest of the current epoch (from a position at or past its end: the next epoch).
    pub fn iter(&self) -> EpochIter {
        let end = self.len();
        let (epoch, start, generation) = {
            let mut p = self.pos.lock().unwrap();
            if p.batch >= end {
                p.epoch += 1;
                p.batch = 0;
            }
            p.generation += 1;
            (p.epoch, p.batch, p.generation)
        };
        let samples = Arc::new(epoch_samples(self.core.index.items.len(), &self.core.cfg, epoch));
        let (tx, rx) = unbounded();
        let mut it = EpochIter {
            core: self.core.clone(),
            pos: self.pos.clone(),
            stats: self.stats.clone(),
            epoch,
            generation,
            samples,
            next: start,
            submitted: start,
            end,
            pending: HashMap::new(),
            tx,
            rx,
            cancel: Arc::new(AtomicBool::new(false)),
        };
        it.fill();
        it
    }
}

/// One pass over the rest of an epoch. At most `prefetch` batches are in flight;
/// batches come out in order whatever the thread count.
pub struct EpochIter {
    core: Arc<Core>,
    pos: Arc<Mutex<Position>>,
    stats: Arc<Mutex<RunStats>>,
    epoch: u64,
    generation: u64,
    samples: Arc<Vec<u32>>,
    next: usize,
    submitted: usize,
    end: usize,
    pending: HashMap<usize, Result<Batch>>,
    tx: Sender<(usize, Result<Batch>)>,
    rx: Receiver<(usize, Result<Batch>)>,
    cancel: Arc<AtomicBool>,
}

impl EpochIter {
    fn fill(&mut self) {
        while self.submitted < self.end && self.submitted < self.next + self.core.prefetch {
            let k = self.submitted;
            let (core, tx, samples, cancel, epoch) =
                (self.core.clone(), self.tx.clone(), self.samples.clone(), self.cancel.clone(), self.epoch);
            self.core.pool.spawn(move || {
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                let bs = core.cfg.batch_size;
                let lo = (k * bs).min(samples.len());
                let hi = ((k + 1) * bs).min(samples.len());
                let r = guarded(|| build_batch(&core.index, &core.row_groups, &core.cfg, epoch, &samples[lo..hi]));
                let _ = tx.send((k, r));
            });
            self.submitted += 1;
        }
    }

    /// Wait (blocking) for batch `k`.
    fn wait(&mut self, k: usize) -> Result<Batch> {
        loop {
            if let Some(r) = self.pending.remove(&k) {
                return r;
            }
            match self.rx.recv() {
                Ok((i, r)) => {
                    self.pending.insert(i, r);
                }
                Err(_) => return Err(LoadError::Internal("loader threads stopped".into())),
            }
        }
    }

    /// Batch `next` was handed out: move the position (to the next epoch after the last batch) and count.
    fn advance(&mut self, batch: &Batch) {
        self.next += 1;
        let mut p = self.pos.lock().unwrap();
        if p.generation == self.generation {
            *p = if self.next >= self.end {
                Position { epoch: self.epoch + 1, batch: 0, generation: p.generation }
            } else {
                Position { epoch: self.epoch, batch: self.next, generation: p.generation }
            };
        }
        drop(p);
        let mut s = self.stats.lock().unwrap();
        s.batches += 1;
        s.pairs += batch.len() as u64;
        s.skipped += batch.skipped.len() as u64;
        s.read_ns += batch.read_ns;
        s.decode_ns += batch.decode_ns;
        for r in &batch.skipped {
            if s.records.len() < MAX_SKIP_RECORDS {
                s.records.push(r.to_string());
            }
        }
    }

    /// Batches left in this pass (before skips).
    pub fn remaining(&self) -> usize {
        self.end.saturating_sub(self.next)
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    /// The next batch with at least one pair (a batch whose pairs were all skipped is passed over);
    /// after an error the pass is over.
    fn next(&mut self) -> Option<Result<Batch>> {
        loop {
            if self.next >= self.end {
                return None;
            }
            self.fill();
            let batch = match self.wait(self.next) {
                Ok(b) => b,
                Err(e) => {
                    self.cancel.store(true, Ordering::Relaxed);
                    self.end = self.next;
                    return Some(Err(e));
                }
            };
            self.advance(&batch);
            if !batch.is_empty() {
                return Some(Ok(batch));
            }
        }
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{png, shard_with, unpaired_shard};

    fn cfg(batch_size: usize) -> Config {
        Config {
            resolution: 8, batch_size, seed: 3, rank: 0, world_size: 1, random_crop: true, random_flip: true,
            strict: false, drop_last: true, empty_prompt_prob: 0.5, shuffle: true,
        }
    }

    fn opts(threads: usize) -> LoaderOptions {
        LoaderOptions {
            format: Format::Pairs, columns: vec![], selection: Selection { drop_ties: true, absolute_winners: false },
            num_threads: threads,
            prefetch: 3, row_group_cache_bytes: 0,
        }
    }

    /// 11 winner/loser rows: 5 batches of 2 a rank with drop_last.
    fn loader(dir: &std::path::Path, batch_size: usize, threads: usize) -> Loader {
        let names: Vec<[String; 3]> = (0..11).map(|i| [format!("c{i}"), format!("u{i}a"), format!("u{i}b")]).collect();
        let rows: Vec<_> = names.iter().enumerate()
            .map(|(i, n)| (n[0].as_str(), (i % 2) as f64, 1.0 - (i % 2) as f64, n[1].as_str(), n[2].as_str()))
            .collect();
        let path = shard_with(dir, &rows, &|i, k| png([(20 * i) as u8, 100 * k, 7], 12, 10));
        Loader::new(&[path], cfg(batch_size), opts(threads)).unwrap()
    }

    fn ids(it: EpochIter) -> Vec<Vec<i64>> {
        it.map(|b| b.unwrap().indices).collect()
    }

    #[test]
    fn passes_walk_epochs_0_1_2_and_the_loader_owns_the_counter() {
        let dir = tempfile::tempdir().unwrap();
        let l = loader(dir.path(), 2, 2);
        assert_eq!(l.len(), 5);
        let mut passes = Vec::new();
        for epoch in 0..3u64 {
            assert_eq!((l.state().epoch, l.state().sample_in_epoch), (epoch, 0));
            let mut it = l.iter();
            let first = it.next().unwrap().unwrap();
            assert_eq!(l.state().sample_in_epoch, 2);
            let rest = ids(it);
            passes.push([vec![first.indices], rest].concat());
        }
        assert_eq!(l.state().epoch, 3);
        assert_ne!(passes[0], passes[1]);
        let fresh = loader(dir.path(), 2, 2);
        fresh.set_epoch(2);
        assert_eq!(ids(fresh.iter()), passes[2]);
    }

    #[test]
    fn resume_mid_epoch_and_at_a_boundary_continues_the_same_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let full = loader(dir.path(), 2, 1);
        let want: Vec<Vec<i64>> = (0..2).flat_map(|_| ids(full.iter())).collect();
        for stop in [3usize, 5] {
            let first = loader(dir.path(), 2, 3);
            let mut head: Vec<Vec<i64>> = first.iter().take(stop).map(|b| b.unwrap().indices).collect();
            let s = first.state();
            assert_eq!((s.epoch, s.sample_in_epoch), if stop == 5 { (1, 0) } else { (0, 6) });
            let resumed = loader(dir.path(), 2, 2);
            resumed.resume(s.epoch, s.sample_in_epoch, &[("seed", 3), ("batch_size", 2), ("world_size", 1)]).unwrap();
            resumed.set_epoch(s.epoch); // a no-op for the current epoch
            while head.len() < want.len() {
                head.extend(ids(resumed.iter()));
            }
            assert_eq!(head, want, "stopped after {stop} batches");
        }
    }

    #[test]
    fn resume_refuses_another_order_and_a_split_batch() {
        let dir = tempfile::tempdir().unwrap();
        let l = loader(dir.path(), 2, 1);
        for (k, v) in [("seed", 4), ("world_size", 2), ("batch_size", 3)] {
            let err = l.resume(0, 2, &[(k, v)]).unwrap_err();
            assert!(err.to_string().contains(k), "{err}");
        }
        assert!(l.resume(0, 3, &[]).unwrap_err().to_string().contains("multiple of batch_size"));
        assert_eq!(l.state().sample_in_epoch, 0);
    }

    #[test]
    fn skipped_images_are_counted_with_their_place_and_a_broken_epoch_ends_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        let uids: Vec<[String; 2]> = (0..6).map(|i| [format!("u{i}a"), format!("u{i}b")]).collect();
        let rows: Vec<_> = uids.iter().map(|u| ("c", 1.0, 0.0, u[0].as_str(), u[1].as_str())).collect();
        let path = shard_with(dir.path(), &rows, &|i, k| {
            if i == 2 && k == 1 { b"\xff\xd8\xff broken".to_vec() } else { png([9, 9, 9], 8, 8) }
        });
        let l = Loader::new(std::slice::from_ref(&path), cfg(3), opts(2)).unwrap();
        let got: usize = l.iter().map(|b| b.unwrap().len()).sum();
        let s = l.run_stats();
        assert_eq!((got, s.skipped, s.pairs), (5, 1, 5));
        assert!(s.records[0].starts_with(&format!("{path} row 2 column jpg_1")), "{:?}", s.records);
        let strict = Loader::new(&[path], Config { strict: true, ..cfg(3) }, opts(2)).unwrap();
        let mut it = strict.iter();
        assert!(it.any(|b| matches!(b, Err(LoadError::Corrupt(_)))));
        assert!(it.next().is_none());
    }

    #[test]
    fn state_and_stats_name_their_fields_and_unpaired_stats_count_the_labels() {
        use arrow_array::BooleanArray;
        let dir = tempfile::tempdir().unwrap();
        let l = loader(dir.path(), 2, 1);
        let keys: Vec<&str> = l.state().entries().iter().map(|e| e.0).collect();
        assert_eq!(keys, ["epoch", "sample_in_epoch", "seed", "world_size", "rank", "batch_size"]);
        let names = |l: &Loader| l.stats().into_iter().map(|e| e.0).collect::<Vec<_>>();
        assert!(!names(&l).contains(&"desirable"));
        let path = unpaired_shard(dir.path(), std::sync::Arc::new(BooleanArray::from(vec![true, false, true, true, false])));
        let u = Loader::new(&[path], cfg(2), LoaderOptions { format: Format::Unpaired, ..opts(1) }).unwrap();
        assert_eq!(u.len(), 2);
        let got: Vec<bool> = u.iter().flat_map(|b| b.unwrap().desirable).collect();
        assert_eq!(got.len(), 4);
        let stats: HashMap<&str, Stat> = u.stats().into_iter().collect();
        assert_eq!(names(&u)[..2], ["format", "files"]);
        assert_eq!((&stats["format"], &stats["desirable"], &stats["undesirable"]), (&Stat::Text("unpaired"), &Stat::Count(3), &Stat::Count(2)));
        assert_eq!((&stats["pairs"], &stats["pairs_yielded"]), (&Stat::Count(5), &Stat::Count(4)));
    }
}
