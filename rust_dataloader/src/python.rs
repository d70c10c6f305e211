//! The PyO3 module `ncp_dataloader`: a thin binding of `loader::Loader` (see
//! docs/internals.md) and of a few helpers that readers and tests use. It only
//! converts arguments and results; every wait releases the GIL; worker panics are
//! caught and raised as RuntimeError. Types: `ncp_dataloader.pyi`.
use crate::batch::{draws, epoch_samples, num_batches, Batch, Config};
use crate::error::LoadError;
use crate::imaging::{decode, resize, shorter_side_size, DecodeError, Pixels};
use crate::columns::Format;
use crate::loader::{panic_message, EpochIter, Loader, LoaderOptions, Stat};
use crate::selection::Selection;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyKeyError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::collections::HashMap;
use std::panic::catch_unwind;
use std::sync::Arc;

create_exception!(ncp_dataloader, CorruptImageError, PyValueError, "A corrupt or truncated image (strict mode).");

/// The one conversion of loader errors into Python exceptions.
fn to_py(e: LoadError) -> PyErr {
    let msg = e.to_string();
    match e {
        LoadError::Io { .. } => PyOSError::new_err(msg),
        LoadError::MissingColumn { .. } => PyKeyError::new_err(msg),
        LoadError::Unsupported(_) | LoadError::Config(_) | LoadError::BadValue { .. } => PyValueError::new_err(msg),
        LoadError::Corrupt(_) => CorruptImageError::new_err(msg),
        LoadError::Internal(_) => PyRuntimeError::new_err(msg),
    }
}

#[pyclass(module = "ncp_dataloader")]
pub struct PairLoader {
    inner: Arc<Loader>,
}

#[pymethods]
impl PairLoader {
    #[new]
    #[pyo3(signature = (sources, resolution, batch_size, seed=0, rank=0, world_size=1, random_crop=false,
        random_flip=true, drop_ties=true, absolute_winners=false, columns=None, num_threads=0, prefetch=4,
        strict=false, drop_last=true, empty_prompt_prob=0.0, shuffle=true, row_group_cache_mb=512, format="pairs"))]
    #[allow(clippy::too_many_arguments)] // the Python signature: keyword arguments, unpacked here only
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
        format: &str,
    ) -> PyResult<Self> {
        let cfg = Config {
            resolution, batch_size, seed, rank, world_size, random_crop, random_flip, strict, drop_last, empty_prompt_prob,
            shuffle,
        };
        let opts = LoaderOptions {
            format: Format::parse(format).map_err(to_py)?,
            columns: columns.unwrap_or_default().into_iter().collect(),
            selection: Selection { drop_ties, absolute_winners },
            num_threads,
            prefetch,
            row_group_cache_bytes: row_group_cache_mb.saturating_mul(1 << 20),
        };
        let inner = py.allow_threads(|| Loader::new(&sources, cfg, opts)).map_err(to_py)?;
        Ok(PairLoader { inner: Arc::new(inner) })
    }

    /// Batches per epoch on this rank.
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Pairs in the index (all ranks, after selection).
    #[getter]
    fn num_pairs(&self) -> usize {
        self.inner.num_pairs()
    }

    /// Start `epoch` from its beginning (a no-op for the current epoch: a resumed position is kept).
    fn set_epoch(&self, epoch: u64) {
        self.inner.set_epoch(epoch)
    }

    /// 'pairs' or 'unpaired'.
    #[getter]
    fn format(&self) -> &'static str {
        self.inner.format().name()
    }

    /// {epoch, sample_in_epoch, seed, world_size, rank, batch_size}: where the next batch comes from.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stat_dict(py, self.inner.state().entries().map(|(k, v)| (k, Stat::Count(v))))
    }

    /// Continue exactly where `state` was taken (same seed, world size and batch size).
    fn resume(&self, state: HashMap<String, u64>) -> PyResult<()> {
        let get = |k: &str| state.get(k).copied().ok_or_else(|| PyKeyError::new_err(format!("state has no '{k}'")));
        let order: Vec<(&str, u64)> =
            ["seed", "world_size", "batch_size"].into_iter().filter_map(|k| state.get(k).map(|&v| (k, v))).collect();
        self.inner.resume(get("epoch")?, get("sample_in_epoch")? as usize, &order).map_err(to_py)
    }

    /// Index counts, and what iteration has yielded and skipped (with file and row): `Loader::stats`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stat_dict(py, self.inner.stats())
    }

    /// The rest of the current epoch; the loader then stands at the next epoch's start.
    fn __iter__(&self) -> PairIter {
        PairIter { inner: self.inner.iter(), resolution: self.inner.config().resolution as usize, format: self.inner.format() }
    }
}

/// The one conversion of the core's named values (state, stats) into a Python dict.
fn stat_dict<'py>(py: Python<'py>, entries: impl IntoIterator<Item = (&'static str, Stat)>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in entries {
        match v {
            Stat::Count(n) => d.set_item(k, n)?,
            Stat::Seconds(x) => d.set_item(k, x)?,
            Stat::Text(t) => d.set_item(k, t)?,
            Stat::Records(r) => d.set_item(k, PyList::new(py, r)?)?,
        }
    }
    Ok(d)
}

/// One pass over the rest of an epoch (`loader::EpochIter`).
#[pyclass(module = "ncp_dataloader")]
pub struct PairIter {
    inner: EpochIter,
    resolution: usize,
    format: Format,
}

/// A batch as a dict: `winners` and `losers` (pairs) or `images` and `desirable` (unpaired), each image
/// buffer uint8 (B, 3, R, R).
fn batch_dict<'py>(py: Python<'py>, b: Batch, res: usize, format: Format) -> PyResult<Bound<'py, PyDict>> {
    let n = b.len();
    let d = PyDict::new(py);
    let names: &[&str] = match format {
        Format::Pairs => &["winners", "losers"],
        Format::Unpaired => &["images"],
    };
    let per_item = b.images.len();
    for (name, buf) in names.iter().zip(b.images) {
        d.set_item(*name, PyArray1::from_vec(py, buf).reshape([n, 3, res, res])?)?;
    }
    if format == Format::Unpaired {
        d.set_item("desirable", PyArray1::from_vec(py, b.desirable))?;
    }
    d.set_item("captions", PyList::new(py, b.captions)?)?;
    d.set_item("original_sizes", PyArray1::from_vec(py, b.original_sizes).reshape([n, 2])?)?;
    d.set_item("crop_top_left", PyArray1::from_vec(py, b.crop_top_left).reshape([n, 2])?)?;
    d.set_item("indices", PyArray1::from_vec(py, b.indices))?;
    d.set_item("image_hashes", PyArray1::from_vec(py, b.image_hashes).reshape([n, per_item])?)?;
    d.set_item("skipped", b.skipped.len())?;
    Ok(d)
}

#[pymethods]
impl PairIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let inner = &mut self.inner;
        match py.allow_threads(|| inner.next()) {
            None => Ok(None),
            Some(Ok(batch)) => batch_dict(py, batch, self.resolution, self.format).map(Some),
            Some(Err(e)) => Err(to_py(e)),
        }
    }

    fn __len__(&self) -> usize {
        self.inner.remaining()
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
/// the answers `ncp.data.expand.expand_sources` must give.
#[pyfunction]
fn expand_sources(sources: Vec<String>) -> PyResult<Vec<String>> {
    crate::sources::expand_sources(&sources).map_err(to_py)
}

/// xxh3-64 of bytes: the image content hash of the latent cache's keys.
#[pyfunction]
fn content_hash(data: &Bound<'_, PyBytes>) -> u64 {
    crate::columns::content_hash(data.as_bytes())
}

/// The uid of an image when the uid columns are missing ("xxh3:" and 16 hex digits; a null: of no bytes):
/// what `ncp.data.pairs.image_uid` must give.
#[pyfunction]
#[pyo3(signature = (data))]
fn image_uid(data: Option<&Bound<'_, PyBytes>>) -> String {
    crate::columns::image_uid(data.map(|d| d.as_bytes()))
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
    m.add_function(wrap_pyfunction!(image_uid, m)?)?;
    m.add("CorruptImageError", m.py().get_type::<CorruptImageError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
