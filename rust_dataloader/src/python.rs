//! The PyO3 module `ncp_dataloader`: `PairLoader` (see docs/internals.md) and
//! two helpers used by the pixel tests. Every wait releases the GIL; worker
//! panics are caught and raised as RuntimeError.
use crate::batch::{build_batch, draws, epoch_samples, num_batches, Batch, Config};
use crate::error::{LoadError, Result as LResult};
use crate::imaging::{decode, resize, shorter_side_size, DecodeError, Pixels};
use crate::source::{build_index, Columns, PairIndex, Selection};
use crossbeam_channel::{unbounded, Receiver, Sender};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyKeyError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

create_exception!(ncp_dataloader, CorruptImageError, PyValueError, "A corrupt or truncated image (strict mode).");

/// How many skipped images are kept, with file and row, for `stats()`.
const MAX_SKIP_RECORDS: usize = 1000;

fn to_py(e: LoadError) -> PyErr {
    let msg = e.to_string();
    match e {
        LoadError::Io { .. } => PyOSError::new_err(msg),
        LoadError::MissingColumn { .. } => PyKeyError::new_err(msg),
        LoadError::Unsupported(_) | LoadError::Config(_) => PyValueError::new_err(msg),
        LoadError::Corrupt(_) => CorruptImageError::new_err(msg),
        LoadError::Internal(_) => PyRuntimeError::new_err(msg),
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Run `f`, turning a panic into LoadError::Internal.
fn guarded<T>(f: impl FnOnce() -> LResult<T>) -> LResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(LoadError::Internal(panic_message(p))))
}

struct Core {
    index: PairIndex,
    cfg: Config,
    pool: rayon::ThreadPool,
    prefetch: usize,
}

/// Where the next batch comes from; `generation` tells the live iterator.
#[derive(Clone, Copy)]
struct Position {
    epoch: u64,
    batch: usize,
    generation: u64,
}

#[derive(Default)]
struct RunStats {
    batches: u64,
    pairs: u64,
    skipped: u64,
    records: Vec<String>,
    read_ns: u64,
    decode_ns: u64,
}

#[pyclass(module = "ncp_dataloader")]
pub struct PairLoader {
    core: Arc<Core>,
    pos: Arc<Mutex<Position>>,
    stats: Arc<Mutex<RunStats>>,
}

#[pymethods]
impl PairLoader {
    #[new]
    #[pyo3(signature = (sources, resolution, batch_size, seed=0, rank=0, world_size=1, random_crop=false,
        random_flip=true, drop_ties=true, absolute_winners=false, columns=None, num_threads=0, prefetch=4,
        strict=false, drop_last=true, empty_prompt_prob=0.0, shuffle=true, row_group_cache_mb=512))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        sources: Vec<String>,
        resolution: u32,
        batch_size: usize,
        seed: u64,
        rank: usize,
        world_size: usize,
        random_crop: bool,
        random_flip: bool,
        drop_ties: bool,
        absolute_winners: bool,
        columns: Option<HashMap<String, String>>,
        num_threads: usize,
        prefetch: usize,
        strict: bool,
        drop_last: bool,
        empty_prompt_prob: f64,
        shuffle: bool,
        row_group_cache_mb: usize,
    ) -> PyResult<Self> {
        let cfg = Config {
            resolution, batch_size, seed, rank, world_size, random_crop, random_flip, strict, drop_last, empty_prompt_prob,
            shuffle,
        };
        cfg.validate().map_err(to_py)?;
        let mut overrides: Vec<(String, String)> = columns.unwrap_or_default().into_iter().collect();
        overrides.sort();
        let cols = Columns::with_overrides(&overrides).map_err(to_py)?;
        let threads = if num_threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            num_threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ncp-loader-{i}"))
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start loader threads: {e}")))?;
        let sel = Selection { drop_ties, absolute_winners };
        let mut index = py
            .allow_threads(|| pool.install(|| guarded(|| build_index(&sources, cols, sel))))
            .map_err(to_py)?;
        index.set_row_group_cache(row_group_cache_mb.saturating_mul(1 << 20));
        let core = Core { index, cfg, pool, prefetch: prefetch.max(1) };
        Ok(PairLoader {
            core: Arc::new(core),
            pos: Arc::new(Mutex::new(Position { epoch: 0, batch: 0, generation: 0 })),
            stats: Arc::default(),
        })
    }

    /// Batches per epoch on this rank.
    fn __len__(&self) -> usize {
        num_batches(self.core.index.pairs.len(), &self.core.cfg)
    }

    /// Pairs in the index (all ranks, after selection).
    #[getter]
    fn num_pairs(&self) -> usize {
        self.core.index.pairs.len()
    }

    /// Start `epoch` from its beginning; a no-op for the current epoch, so that a
    /// resumed position is kept when the trainer calls set_epoch after resume.
    fn set_epoch(&mut self, epoch: u64) {
        let mut p = self.pos.lock().unwrap();
        if p.epoch != epoch {
            *p = Position { epoch, batch: 0, generation: p.generation + 1 };
        }
    }

    /// {epoch, sample_in_epoch, seed, world_size, rank, batch_size}: where the next batch comes from.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = *self.pos.lock().unwrap();
        let cfg = &self.core.cfg;
        let d = PyDict::new(py);
        d.set_item("epoch", p.epoch)?;
        d.set_item("sample_in_epoch", p.batch * cfg.batch_size)?;
        d.set_item("seed", cfg.seed)?;
        d.set_item("world_size", cfg.world_size)?;
        d.set_item("rank", cfg.rank)?;
        d.set_item("batch_size", cfg.batch_size)?;
        Ok(d)
    }

    /// Continue exactly where `state` was taken (same seed, world size and batch size).
    fn resume(&mut self, state: HashMap<String, u64>) -> PyResult<()> {
        let cfg = &self.core.cfg;
        let get = |k: &str| state.get(k).copied().ok_or_else(|| PyKeyError::new_err(format!("state has no '{k}'")));
        let (epoch, sample) = (get("epoch")?, get("sample_in_epoch")? as usize);
        for (k, want) in [("seed", cfg.seed), ("world_size", cfg.world_size as u64), ("batch_size", cfg.batch_size as u64)] {
            if let Some(&have) = state.get(k) {
                if have != want {
                    return Err(PyValueError::new_err(format!(
                        "cannot resume: state has {k}={have} but the loader has {k}={want} (the order would differ)"
                    )));
                }
            }
        }
        if sample % cfg.batch_size != 0 {
            return Err(PyValueError::new_err(format!(
                "cannot resume: sample_in_epoch={sample} is not a multiple of batch_size={}", cfg.batch_size
            )));
        }
        let mut p = self.pos.lock().unwrap();
        *p = Position { epoch, batch: sample / cfg.batch_size, generation: p.generation + 1 };
        Ok(())
    }

    /// Index counts, and what iteration has yielded and skipped (with file and row).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let i = &self.core.index.stats;
        let s = self.stats.lock().unwrap();
        let d = PyDict::new(py);
        d.set_item("files", i.files)?;
        d.set_item("rows", i.rows)?;
        d.set_item("ties", i.ties)?;
        d.set_item("dropped_ties", i.dropped_ties)?;
        d.set_item("dropped_not_absolute", i.dropped_not_absolute)?;
        d.set_item("pairs", i.pairs)?;
        d.set_item("batches_yielded", s.batches)?;
        d.set_item("pairs_yielded", s.pairs)?;
        d.set_item("skipped", s.skipped)?;
        d.set_item("skipped_records", PyList::new(py, &s.records)?)?;
        d.set_item("num_threads", self.core.pool.current_num_threads())?;
        d.set_item("read_seconds", s.read_ns as f64 * 1e-9)?;
        d.set_item("decode_seconds", s.decode_ns as f64 * 1e-9)?;
        let rgc = &self.core.index.row_groups;
        d.set_item("row_group_reads", rgc.reads.load(Ordering::Relaxed))?;
        d.set_item("row_group_cache_hits", rgc.hits.load(Ordering::Relaxed))?;
        d.set_item("row_group_cache_bytes", rgc.held_bytes())?;
        d.set_item("row_group_cache_budget", rgc.budget())?;
        Ok(d)
    }

    fn __iter__(&self) -> PairIter {
        let (epoch, start, generation) = {
            let mut p = self.pos.lock().unwrap();
            p.generation += 1;
            (p.epoch, p.batch, p.generation)
        };
        let n = self.core.index.pairs.len();
        let samples = Arc::new(epoch_samples(n, &self.core.cfg, epoch));
        let (tx, rx) = unbounded();
        let mut it = PairIter {
            core: self.core.clone(),
            pos: self.pos.clone(),
            stats: self.stats.clone(),
            epoch,
            generation,
            samples,
            next: start,
            submitted: start,
            end: num_batches(n, &self.core.cfg),
            pending: HashMap::new(),
            tx,
            rx,
            cancel: Arc::new(AtomicBool::new(false)),
        };
        it.fill();
        it
    }
}

/// One pass over the rest of an epoch. At most `prefetch` batches are in flight.
#[pyclass(module = "ncp_dataloader")]
pub struct PairIter {
    core: Arc<Core>,
    pos: Arc<Mutex<Position>>,
    stats: Arc<Mutex<RunStats>>,
    epoch: u64,
    generation: u64,
    samples: Arc<Vec<u32>>,
    next: usize,
    submitted: usize,
    end: usize,
    pending: HashMap<usize, LResult<Batch>>,
    tx: Sender<(usize, LResult<Batch>)>,
    rx: Receiver<(usize, LResult<Batch>)>,
    cancel: Arc<AtomicBool>,
}

impl PairIter {
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
                let r = guarded(|| build_batch(&core.index, &core.cfg, epoch, &samples[lo..hi]));
                let _ = tx.send((k, r));
            });
            self.submitted += 1;
        }
    }

    /// Wait (GIL released) for batch `k`.
    fn wait(&mut self, py: Python<'_>, k: usize) -> LResult<Batch> {
        loop {
            if let Some(r) = self.pending.remove(&k) {
                return r;
            }
            let rx = &self.rx;
            match py.allow_threads(|| rx.recv()) {
                Ok((i, r)) => {
                    self.pending.insert(i, r);
                }
                Err(_) => return Err(LoadError::Internal("loader threads stopped".into())),
            }
        }
    }

    fn advance(&mut self, batch: Option<&Batch>) {
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
        if let Some(b) = batch {
            let mut s = self.stats.lock().unwrap();
            s.batches += 1;
            s.pairs += b.len() as u64;
            s.skipped += b.skipped.len() as u64;
            s.read_ns += b.read_ns;
            s.decode_ns += b.decode_ns;
            for r in &b.skipped {
                if s.records.len() < MAX_SKIP_RECORDS {
                    s.records.push(r.to_string());
                }
            }
        }
    }
}

fn batch_dict<'py>(py: Python<'py>, b: Batch, res: usize) -> PyResult<Bound<'py, PyDict>> {
    let n = b.len();
    let d = PyDict::new(py);
    d.set_item("winners", PyArray1::from_vec(py, b.winners).reshape([n, 3, res, res])?)?;
    d.set_item("losers", PyArray1::from_vec(py, b.losers).reshape([n, 3, res, res])?)?;
    d.set_item("captions", PyList::new(py, b.captions)?)?;
    d.set_item("original_sizes", PyArray1::from_vec(py, b.original_sizes).reshape([n, 2])?)?;
    d.set_item("crop_top_left", PyArray1::from_vec(py, b.crop_top_left).reshape([n, 2])?)?;
    d.set_item("indices", PyArray1::from_vec(py, b.indices))?;
    d.set_item("image_hashes", PyArray1::from_vec(py, b.image_hashes).reshape([n, 2])?)?;
    d.set_item("skipped", b.skipped.len())?;
    Ok(d)
}

#[pymethods]
impl PairIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        loop {
            if self.next >= self.end {
                return Ok(None);
            }
            self.fill();
            let k = self.next;
            let batch = match self.wait(py, k) {
                Ok(b) => b,
                Err(e) => {
                    self.cancel.store(true, Ordering::Relaxed);
                    self.end = self.next; // the iterator is finished after an error
                    return Err(to_py(e));
                }
            };
            self.advance(Some(&batch));
            if batch.is_empty() {
                continue; // every pair of this batch was skipped
            }
            return batch_dict(py, batch, self.core.cfg.resolution as usize).map(Some);
        }
    }

    fn __len__(&self) -> usize {
        self.end.saturating_sub(self.next)
    }
}

impl Drop for PairIter {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

fn image_array<'py>(py: Python<'py>, px: Pixels) -> PyResult<Bound<'py, PyAny>> {
    let (h, w) = (px.height as usize, px.width as usize);
    let rgb: Vec<u8> = if px.channels == 1 { px.data.iter().flat_map(|&v| [v, v, v]).collect() } else { px.data };
    Ok(PyArray1::from_vec(py, rgb).reshape([h, w, 3])?.into_any())
}

fn decode_err(e: DecodeError) -> PyErr {
    match e {
        DecodeError::Corrupt(m) => CorruptImageError::new_err(m),
        DecodeError::Unsupported(m) => PyValueError::new_err(format!("unsupported: {m}")),
    }
}

/// Decode encoded image bytes to uint8 (H, W, 3), like PIL's `convert("RGB")`.
#[pyfunction]
fn decode_image<'py>(py: Python<'py>, data: &Bound<'py, PyBytes>) -> PyResult<Bound<'py, PyAny>> {
    let bytes = data.as_bytes().to_vec();
    let px = py.allow_threads(|| catch_unwind(|| decode(&bytes)))
        .map_err(|p| PyRuntimeError::new_err(panic_message(p)))?
        .map_err(decode_err)?;
    image_array(py, px)
}

/// Decode and resize the shorter side to `resolution` (no crop): uint8 (h, w, 3).
#[pyfunction]
fn resize_image<'py>(py: Python<'py>, data: &Bound<'py, PyBytes>, resolution: u32) -> PyResult<Bound<'py, PyAny>> {
    let bytes = data.as_bytes().to_vec();
    let out = py.allow_threads(|| {
        catch_unwind(|| {
            let px = decode(&bytes)?;
            let (w, h) = shorter_side_size(px.width, px.height, resolution);
            resize(px, w, h)
        })
    });
    let px = out.map_err(|p| PyRuntimeError::new_err(panic_message(p)))?.map_err(decode_err)?;
    image_array(py, px)
}

fn order_config(seed: u64, rank: usize, world_size: usize, batch_size: usize, drop_last: bool) -> PyResult<Config> {
    let cfg = Config {
        resolution: 1, batch_size, seed, rank, world_size, random_crop: false, random_flip: false,
        strict: false, drop_last, empty_prompt_prob: 0.0, shuffle: true,
    };
    cfg.validate().map_err(to_py)?;
    Ok(cfg)
}

/// This rank's pair ids for an epoch, batch by batch, exactly as `PairLoader` orders
/// them: int64 (num_batches, batch_size) with drop_last, else a flat (n,) array.
#[pyfunction]
#[pyo3(signature = (num_pairs, batch_size, seed, epoch, rank=0, world_size=1, drop_last=true))]
#[allow(clippy::too_many_arguments)]
fn epoch_order<'py>(
    py: Python<'py>, num_pairs: usize, batch_size: usize, seed: u64, epoch: u64, rank: usize, world_size: usize,
    drop_last: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let cfg = order_config(seed, rank, world_size, batch_size, drop_last)?;
    let nb = num_batches(num_pairs, &cfg);
    let mut order: Vec<i64> = epoch_samples(num_pairs, &cfg, epoch).into_iter().map(i64::from).collect();
    if drop_last {
        order.truncate(nb * batch_size);
        return Ok(PyArray1::from_vec(py, order).reshape([nb, batch_size])?.into_any());
    }
    Ok(PyArray1::from_vec(py, order).into_any())
}

/// The per-pair draws `PairLoader` makes for (seed, epoch, index): (flip, empty_prompt)
/// as two bool arrays, for readers (the latent cache) that must agree with it.
#[pyfunction]
fn augment_draws<'py>(
    py: Python<'py>, seed: u64, epoch: u64, indices: Vec<u32>, random_flip: bool, empty_prompt_prob: f64,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let mut cfg = order_config(seed, 0, 1, 1, true)?;
    cfg.random_flip = random_flip;
    cfg.empty_prompt_prob = empty_prompt_prob;
    let (flips, drops): (Vec<bool>, Vec<bool>) = indices.iter().map(|&i| {
        let d = draws(&cfg, epoch, i);
        (d.flip, d.drop_caption)
    }).unzip();
    Ok((PyArray1::from_vec(py, flips).into_any(), PyArray1::from_vec(py, drops).into_any()))
}

/// The files `PairLoader` reads for `sources` (paths, globs, folders), in order:
/// the answers `ncp.data.paths.expand_sources` must give.
#[pyfunction]
fn expand_sources(sources: Vec<String>) -> PyResult<Vec<String>> {
    crate::source::expand_sources(&sources).map_err(to_py)
}

/// xxh3-64 of bytes: the image content hash of the latent cache's keys.
#[pyfunction]
fn content_hash(data: &Bound<'_, PyBytes>) -> u64 {
    crate::source::content_hash(data.as_bytes())
}

#[pymodule]
fn ncp_dataloader(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PairLoader>()?;
    m.add_class::<PairIter>()?;
    m.add_function(wrap_pyfunction!(decode_image, m)?)?;
    m.add_function(wrap_pyfunction!(resize_image, m)?)?;
    m.add_function(wrap_pyfunction!(epoch_order, m)?)?;
    m.add_function(wrap_pyfunction!(augment_draws, m)?)?;
    m.add_function(wrap_pyfunction!(content_hash, m)?)?;
    m.add_function(wrap_pyfunction!(expand_sources, m)?)?;
    m.add("CorruptImageError", m.py().get_type::<CorruptImageError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
