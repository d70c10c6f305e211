//! Row groups' image columns kept in memory up to a byte budget (`RowGroupCache`),
//! so that the pairs of one row group in later batches do not read and decode it again.
use crate::error::{io_err, LoadError, Result};
use crate::source::{binaries, column, read_columns, FileKind, PairIndex};
use arrow_array::{Array, ArrayRef, BinaryArray, LargeBinaryArray};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The image columns of all rows of one row group (jpg_0, jpg_1 for pairs; the image for unpaired rows).
pub struct RowGroupImages {
    columns: Vec<ArrayRef>,
    /// Memory held by the arrays.
    pub bytes: usize,
}

impl RowGroupImages {
    /// The bytes of the images of row `row` of the group, in column order (None for a null).
    pub fn images(&self, row: usize) -> Vec<Option<&[u8]>> {
        self.columns.iter().map(|c| binary_at(c, row)).collect()
    }
}

/// Row `i` of a binary array (checked to be Binary or LargeBinary when read).
fn binary_at(arr: &ArrayRef, i: usize) -> Option<&[u8]> {
    if arr.is_null(i) {
        return None;
    }
    if let Some(a) = arr.as_any().downcast_ref::<BinaryArray>() {
        return Some(a.value(i));
    }
    arr.as_any().downcast_ref::<LargeBinaryArray>().map(|a| a.value(i))
}

/// Read the image columns of every row of one row group.
pub fn read_row_group_images(index: &PairIndex, file: u32, row_group: u32) -> Result<RowGroupImages> {
    let f = &index.files[file as usize];
    let FileKind::Parquet { row_group_starts, .. } = &f.kind else {
        return Err(LoadError::Internal("read_row_group_images on a non-parquet source".into()));
    };
    let rg = row_group as usize;
    let rg_rows = (row_group_starts[rg + 1] - row_group_starts[rg]) as usize;
    let names = index.columns.images();
    let batches = read_columns(f, &names, Some(vec![rg]), None, rg_rows)?;
    let concat = |name: &str| -> Result<ArrayRef> {
        let parts: Vec<&dyn Array> = batches.iter().map(|b| column(b, name).as_ref()).collect();
        let arr = match parts.len() {
            1 => column(&batches[0], name).clone(),
            _ => arrow_select::concat::concat(&parts).map_err(|e| io_err(&f.path, e))?,
        };
        binaries(&arr, &f.path, name)?; // the type check
        Ok(arr)
    };
    let columns: Vec<ArrayRef> = names.iter().map(|(_, name)| concat(name)).collect::<Result<_>>()?;
    if let Some(c) = columns.iter().find(|c| c.len() != rg_rows) {
        return Err(io_err(&f.path, format!("row group {rg}: read {} rows, expected {rg_rows}", c.len())));
    }
    let bytes = columns.iter().map(|c| c.get_array_memory_size()).sum();
    Ok(RowGroupImages { columns, bytes })
}

type Slot = Arc<OnceLock<Result<Arc<RowGroupImages>>>>;

struct CacheEntry {
    slot: Slot,
    /// Bytes held once read (0 while the read is in flight).
    bytes: usize,
    last_use: u64,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<(u32, u32), CacheEntry>,
    /// last_use -> key of every completed entry: the least recently used first.
    order: BTreeMap<u64, (u32, u32)>,
    bytes: usize,
    tick: u64,
}

/// Row groups' image columns, read whole and kept up to a byte budget (least recently
/// used evicted first), so that the pairs of one row group in later batches do not read
/// and decode it again. Parquet's unit of I/O is the row group: a pyarrow-written shard
/// keeps the images of a row group in one dictionary page, which any read of one of
/// its rows decompresses and decodes whole. Concurrent requests for one group share a
/// single read. The bytes handed out are those of a direct row-selection read.
#[derive(Default)]
pub struct RowGroupCache {
    budget: usize,
    /// The image columns of every parquet row group together (metadata sizes).
    total: usize,
    state: Mutex<CacheState>,
    pub reads: AtomicU64,
    pub hits: AtomicU64,
}

impl RowGroupCache {
    pub fn new(budget: usize, index: &PairIndex) -> Self {
        let total: usize = (0..index.files.len() as u32)
            .flat_map(|f| (0..row_group_count(index, f)).map(move |rg| (f, rg)))
            .map(|(f, rg)| image_chunk_bytes(index, f, rg))
            .sum();
        RowGroupCache { budget, total, ..Default::default() }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// The image columns of all row groups (metadata sizes): what the whole data set would take.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Whether reading the whole row group and keeping it pays: the cache is on, the group
    /// takes at most half the budget, and either the whole data set fits (later epochs
    /// never read again), or the group's images are dictionary-encoded (any read decodes
    /// the whole dictionary page anyway) and at least a quarter of the data set fits (so
    /// that a shuffled order finds a fair share of its groups in memory). Otherwise a
    /// batch reads only its selected rows, as without the cache.
    pub fn worth_it(&self, index: &PairIndex, file: u32, row_group: u32) -> bool {
        if self.budget == 0 || image_chunk_bytes(index, file, row_group) > self.budget / 2 {
            return false;
        }
        self.total <= self.budget
            || (self.total / 4 <= self.budget && image_chunks_dictionary_encoded(index, file, row_group))
    }

    /// The images of one row group: from memory, or read once (concurrent callers wait for that read).
    pub fn get(&self, index: &PairIndex, file: u32, row_group: u32) -> Result<Arc<RowGroupImages>> {
        let key = (file, row_group);
        let slot = {
            let mut st = self.state.lock().unwrap();
            st.tick += 1;
            let tick = st.tick;
            let st = &mut *st;
            let e = st.entries.entry(key).or_insert_with(|| CacheEntry { slot: Arc::default(), bytes: 0, last_use: 0 });
            if e.bytes > 0 {
                st.order.remove(&e.last_use);
                st.order.insert(tick, key);
            }
            e.last_use = tick;
            e.slot.clone()
        };
        let mut fresh = false;
        let r = slot
            .get_or_init(|| {
                fresh = true;
                self.reads.fetch_add(1, Ordering::Relaxed);
                read_row_group_images(index, file, row_group).map(Arc::new)
            })
            .clone();
        if !fresh {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return r;
        }
        let mut st = self.state.lock().unwrap();
        let st = &mut *st;
        let ours = st.entries.get(&key).is_some_and(|e| Arc::ptr_eq(&e.slot, &slot));
        match (&r, ours) {
            (Ok(imgs), true) => {
                let e = st.entries.get_mut(&key).unwrap();
                e.bytes = imgs.bytes.max(1);
                st.bytes += e.bytes;
                st.order.insert(e.last_use, key);
                while st.bytes > self.budget {
                    let Some((_, old)) = st.order.pop_first() else { break };
                    if let Some(e) = st.entries.remove(&old) {
                        st.bytes -= e.bytes;
                    }
                }
            }
            (Err(_), true) => {
                st.entries.remove(&key); // a later batch tries again
            }
            _ => {}
        }
        r
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.state.lock().unwrap().bytes
    }
}

fn row_group_count(index: &PairIndex, file: u32) -> u32 {
    match &index.files[file as usize].kind {
        FileKind::Parquet { meta, .. } => meta.metadata().num_row_groups() as u32,
        FileKind::Jsonl { .. } => 0,
    }
}

/// The image column chunks of a row group (metadata).
fn image_chunks(index: &PairIndex, file: u32, row_group: u32) -> Vec<&parquet::file::metadata::ColumnChunkMetaData> {
    let FileKind::Parquet { meta, .. } = &index.files[file as usize].kind else { return Vec::new() };
    let rg = meta.metadata().row_group(row_group as usize);
    let names: Vec<&str> = index.columns.images().into_iter().map(|(_, name)| name).collect();
    rg.columns().iter().filter(|c| c.column_path().parts().len() == 1 && names.contains(&c.column_path().parts()[0].as_str())).collect()
}

/// Upper bound of the memory the image columns of a row group take once read.
fn image_chunk_bytes(index: &PairIndex, file: u32, row_group: u32) -> usize {
    image_chunks(index, file, row_group)
        .iter()
        .map(|c| c.uncompressed_size().max(c.compressed_size()).max(0) as usize)
        .sum()
}

fn image_chunks_dictionary_encoded(index: &PairIndex, file: u32, row_group: u32) -> bool {
    let chunks = image_chunks(index, file, row_group);
    !chunks.is_empty() && chunks.iter().all(|c| c.dictionary_page_offset().is_some())
}
