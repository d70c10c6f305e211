//! Row groups' image columns kept in memory up to a byte budget (`RowGroupCache`),
//! so that the items of one row group in later batches do not read and decode it again.
use crate::columns::binary_at;
use crate::error::Result;
use crate::index::ItemIndex;
use crate::parquet::{chunk_bytes, chunks_dictionary_encoded, read_row_group, row_group_count};
use arrow_array::{Array, ArrayRef};
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

/// Read the image columns of every row of one row group.
pub fn read_row_group_images(index: &ItemIndex, file: u32, row_group: u32) -> Result<RowGroupImages> {
    let columns = read_row_group(&index.files[file as usize], &index.columns.images(), row_group)?;
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
    pub fn new(budget: usize, index: &ItemIndex) -> Self {
        let total: usize = (0..index.files.len() as u32)
            .flat_map(|f| (0..row_group_count(&index.files[f as usize])).map(move |rg| (f, rg)))
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
    pub fn worth_it(&self, index: &ItemIndex, file: u32, row_group: u32) -> bool {
        if self.budget == 0 || image_chunk_bytes(index, file, row_group) > self.budget / 2 {
            return false;
        }
        self.total <= self.budget
            || (self.total / 4 <= self.budget && image_chunks_dictionary_encoded(index, file, row_group))
    }

    /// The images of one row group: from memory, or read once (concurrent callers wait for that read).
    pub fn get(&self, index: &ItemIndex, file: u32, row_group: u32) -> Result<Arc<RowGroupImages>> {
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

/// Upper bound of the memory the image columns of a row group take once read.
fn image_chunk_bytes(index: &ItemIndex, file: u32, row_group: u32) -> usize {
    chunk_bytes(&index.files[file as usize], &index.columns.images(), row_group)
}

fn image_chunks_dictionary_encoded(index: &ItemIndex, file: u32, row_group: u32) -> bool {
    chunks_dictionary_encoded(&index.files[file as usize], &index.columns.images(), row_group)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::columns::Columns;
    use crate::index::build_index;
    use crate::item::Location;
    use crate::parquet::read_images;
    use crate::selection::Selection;
    use crate::testutil::{byte_shard, write_parquet};
    use arrow_array::{BinaryArray, Float64Array, StringArray};
    use parquet::file::properties::WriterProperties;
    use rayon::prelude::*;
    use std::sync::atomic::Ordering::Relaxed;

    const SEL: Selection = Selection { drop_ties: true, absolute_winners: false };

    fn index_of(path: &str) -> ItemIndex {
        build_index(&[path.to_string()], Columns::with_overrides(&[]).unwrap(), SEL).unwrap()
    }

    fn counts(c: &RowGroupCache) -> (u64, u64) {
        (c.reads.load(Relaxed), c.hits.load(Relaxed))
    }

    /// 9 rows in 3 row groups of 3, every image cell 100 bytes (row i, image k: all bytes 2 i + k), so that
    /// the groups take the same memory.
    fn even_shard(dir: &std::path::Path) -> String {
        let cell = |i: usize, k: usize| vec![(2 * i + k) as u8; 100];
        let img = |k: usize| -> ArrayRef {
            let v: Vec<Vec<u8>> = (0..9).map(|i| cell(i, k)).collect();
            Arc::new(BinaryArray::from(v.iter().map(|x| x.as_slice()).collect::<Vec<_>>()))
        };
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("caption", Arc::new(StringArray::from(vec!["c"; 9]))),
            ("jpg_0", img(0)),
            ("jpg_1", img(1)),
            ("label_0", Arc::new(Float64Array::from(vec![1.0; 9]))),
            ("label_1", Arc::new(Float64Array::from(vec![0.0; 9]))),
        ];
        let props = WriterProperties::builder().set_max_row_group_size(3).set_dictionary_enabled(false).build();
        write_parquet(&dir.join("even.parquet"), cols, props)
    }

    #[test]
    fn a_row_group_read_twice_is_read_once_from_disk_when_it_fits() {
        let dir = tempfile::tempdir().unwrap();
        let path = even_shard(dir.path());
        let index = index_of(&path);
        let cache = RowGroupCache::new(1 << 20, &index);
        let first = cache.get(&index, 0, 1).unwrap();
        assert_eq!(counts(&cache), (1, 0));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap(); // from now on a read from disk fails
        let again = cache.get(&index, 0, 1).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(counts(&cache), (1, 1));
        assert_eq!(again.images(2), vec![Some(&[10u8; 100][..]), Some(&[11u8; 100][..])]); // row 5: bytes 2 * 5 + k
        // a failed read is not kept: the next request reads again
        assert!(cache.get(&index, 0, 2).is_err());
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(cache.get(&index, 0, 2).unwrap().images(0)[0], Some(&[12u8; 100][..]));
        assert_eq!(counts(&cache), (3, 1));
        assert_eq!(cache.held_bytes(), first.bytes * 2);
    }

    #[test]
    fn held_bytes_stay_within_the_budget_and_the_least_recently_used_group_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let index = index_of(&even_shard(dir.path()));
        let big = RowGroupCache::new(1 << 20, &index);
        let sizes: Vec<usize> = (0..3).map(|rg| big.get(&index, 0, rg).unwrap().bytes).collect();
        assert!(sizes[0] >= 600 && sizes.iter().all(|&b| b == sizes[0]), "{sizes:?}"); // 3 rows x 2 images x 100 bytes
        assert_eq!(big.held_bytes(), 3 * sizes[0]);
        let one = sizes[0];
        let c = RowGroupCache::new(2 * one, &index); // room for two groups
        for (rg, held) in [(0, one), (1, 2 * one), (0, 2 * one), (2, 2 * one)] {
            c.get(&index, 0, rg).unwrap();
            assert_eq!(c.held_bytes(), held, "after group {rg}");
        }
        assert_eq!(counts(&c), (3, 1)); // 0, 1, 2 read; 0 again a hit
        c.get(&index, 0, 0).unwrap(); // 0 was used after 1, so 2 evicted 1 and kept 0
        assert_eq!(counts(&c), (3, 2));
        c.get(&index, 0, 1).unwrap(); // 1 is read again, evicting 2 (0 was used since)
        c.get(&index, 0, 0).unwrap();
        assert_eq!(counts(&c), (4, 3));
        // a budget below one group keeps nothing
        let tiny = RowGroupCache::new(one - 1, &index);
        tiny.get(&index, 0, 0).unwrap();
        tiny.get(&index, 0, 0).unwrap();
        assert_eq!((counts(&tiny), tiny.held_bytes()), ((2, 0), 0));
    }

    #[test]
    fn cached_bytes_are_those_of_a_direct_read_and_concurrent_requests_share_one_read() {
        let dir = tempfile::tempdir().unwrap();
        for dictionary in [true, false] {
            let index = index_of(&byte_shard(dir.path(), 11, dictionary));
            let cache = RowGroupCache::new(1 << 20, &index);
            for p in &index.items {
                let Location::Parquet { row_group, row_in_group } = p.location else { panic!() };
                assert!(cache.worth_it(&index, p.file, row_group)); // all fits
                let direct = read_images(&index.files[0], &index.columns.images(), row_group, &[row_in_group]).unwrap().remove(0);
                let imgs = cache.get(&index, p.file, row_group).unwrap();
                let cached: Vec<Option<Vec<u8>>> = imgs.images(row_in_group as usize).into_iter().map(|x| x.map(<[u8]>::to_vec)).collect();
                assert_eq!(cached, direct);
            }
            // 4 row groups of 3, 3, 3, 2 rows: each read once, the other rows were hits
            assert_eq!(counts(&cache), (4, 7));
        }
        let index = index_of(&byte_shard(dir.path(), 11, true));
        let c = RowGroupCache::new(1 << 20, &index);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        pool.install(|| (0..32).into_par_iter().for_each(|_| { c.get(&index, 0, 3).unwrap(); }));
        assert_eq!(counts(&c), (1, 31));
    }

    #[test]
    fn whole_row_groups_are_read_when_the_data_fits_or_is_dictionary_encoded() {
        let dir = tempfile::tempdir().unwrap();
        for dictionary in [true, false] {
            let index = index_of(&byte_shard(dir.path(), 30, dictionary));
            let total = RowGroupCache::new(1 << 30, &index).total();
            let worth = |budget: usize| RowGroupCache::new(budget, &index).worth_it(&index, 0, 0);
            assert_eq!(RowGroupCache::new(0, &index).total(), total);
            assert!(worth(1 << 30)); // all fits
            assert!(worth(total));
            assert_eq!(worth(total / 2), dictionary); // half fits: only a dictionary page is read whole anyway
            assert!(!worth(total / 8)); // an eighth: too few hits in a shuffled order
            assert!(!worth(0)); // off
        }
        // the groups' metadata sizes add up to the total
        let index = index_of(&even_shard(dir.path()));
        let one = image_chunk_bytes(&index, 0, 0);
        assert!(one >= 600);
        assert_eq!(RowGroupCache::new(0, &index).total(), 3 * one);
        // a group above half the budget is read by row selection, even where the whole data set fits
        let single = index_of(&byte_shard(dir.path(), 3, true)); // one row group
        let total = RowGroupCache::new(0, &single).total();
        assert_eq!(total, image_chunk_bytes(&single, 0, 0));
        assert!(!RowGroupCache::new(total, &single).worth_it(&single, 0, 0));
        assert!(!RowGroupCache::new(2 * total - 1, &single).worth_it(&single, 0, 0));
        assert!(RowGroupCache::new(2 * total, &single).worth_it(&single, 0, 0));
    }
}
