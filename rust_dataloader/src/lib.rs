//! ncp_dataloader: preference pairs and unpaired images (Pick-a-Pic parquet or JSONL) decoded,
//! resized, cropped and batched in parallel outside the GIL. The latent cache (written and read in
//! Python, `ncp.data.cache`) uses its order and draws.
//!
//! Order comes from indices, never from threads: a permutation per (seed, epoch), split by rank;
//! augmentation per (seed, epoch, item index); batches delivered in order whatever the thread count.
//!
//! One item type for both formats: an item is R images with R labels (`item`; R = 2 for a pair, 1 for
//! an unpaired image), read by one reader per file format (`parquet`, `jsonl`); the `Format` in
//! `columns` decides R and the columns.
//!
//! Modules, in layers (a module uses only modules of lower layers, or of its own layer listed before
//! it; `tests::modules_import_each_other_without_a_circle` checks that the `crate::` paths of
//! `src/*.rs` form no circle):
//!
//! 0. `error` (the errors and their messages), `rng` (keyed random streams), `testutil` (test data,
//!    `cargo test` only)
//! 1. `decode` (image decoding that refuses what Pillow refuses) <- `imaging` (resize, crop, flip);
//!    `columns` (formats, column names, typing of column values, content hashes); `item` (the item);
//!    `sources` (expansion of paths, globs and folders; opening files)
//! 2. readers: `parquet`, `jsonl` (items of a file; parquet: image bytes by rows or row groups);
//!    `selection` (ties, winners, absolute winners)
//! 3. `index` (the item index of all sources)
//! 4. `row_cache` (row groups in memory) <- `batch` (epoch plans and batch assembly)
//! 5. `loader` (prefetch, position, resume, stats: the core, tested by `cargo test`)
//! 6. `python` (the PyO3 binding only, behind the `python` feature)
//!
//! The graph (`a -> b`: `a` uses `b`; tests also use `testutil`, and `imaging`'s tests `rng`):
//!
//! ```text
//! python    -> loader, batch, imaging, columns, selection, sources, error
//! loader    -> batch, row_cache, index, columns, selection, error
//! batch     -> row_cache, index, parquet, sources, item, columns, imaging, rng, error
//! row_cache -> index, parquet, columns, error
//! index     -> parquet, jsonl, selection, sources, item, columns, error
//! parquet   -> sources, item, columns, error
//! jsonl     -> sources, item, columns, error
//! selection -> item
//! sources   -> error
//! columns   -> error
//! imaging   -> decode
//! item, decode, rng, error, testutil -> (none)
//! ```
pub mod batch;
pub mod columns;
pub mod decode;
pub mod error;
pub mod imaging;
pub mod index;
pub mod item;
pub mod jsonl;
pub mod loader;
pub mod parquet;
pub mod rng;
pub mod row_cache;
pub mod selection;
pub mod sources;
#[cfg(test)]
mod testutil;

#[cfg(feature = "python")]
mod python;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// The modules that each `src/*.rs` file names as `crate::<module>` (comments left out; tests in).
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph = BTreeMap::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            let mut uses = BTreeSet::new();
            for line in text.lines() {
                let code = line.split("//").next().unwrap();
                for (at, _) in code.match_indices("crate::") {
                    let rest = &code[at + "crate::".len()..];
                    let module: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !module.is_empty() && module != name {
                        uses.insert(module);
                    }
                }
            }
            graph.insert(name, uses);
        }
        graph
    }

    /// A circle in `graph`, as the modules along it, if there is one.
    fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
        fn visit(
            m: &str, graph: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|p| p == m) {
                let mut c = path[at..].to_vec();
                c.push(m.to_string());
                return Some(c);
            }
            if !done.insert(m.to_string()) {
                return None;
            }
            path.push(m.to_string());
            for next in graph.get(m).into_iter().flatten() {
                if let Some(c) = visit(next, graph, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            None
        }
        let mut done = BTreeSet::new();
        graph.keys().find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
    }

    #[test]
    fn modules_import_each_other_without_a_circle() {
        let graph = imports();
        for (m, uses) in &graph {
            for u in uses {
                assert!(graph.contains_key(u), "{m}.rs names crate::{u}, which is no file in src/");
            }
        }
        assert_eq!(circle(&graph), None, "an import circle among the crate's modules; the graph: {graph:?}");
        assert!(graph["error"].is_empty() && graph["testutil"].is_empty() && graph["item"].is_empty());
        assert!(!graph["index"].contains("row_cache") && !graph["parquet"].contains("index"));
    }

    #[test]
    fn the_circle_check_finds_a_circle() {
        let g = |edges: &[(&str, &str)]| {
            let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (a, b) in edges {
                graph.entry(a.to_string()).or_default().insert(b.to_string());
                graph.entry(b.to_string()).or_default();
            }
            graph
        };
        assert_eq!(circle(&g(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
        assert_eq!(circle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    }
}
