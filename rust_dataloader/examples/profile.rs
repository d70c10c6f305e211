//! Per-stage timings of the loader on one parquet file (development aid):
//! `cargo run --release --example profile -- FILE [RES] [BATCH]`.
use ncp_dataloader::batch::{epoch_samples, Config};
use ncp_dataloader::imaging::{crop_flip_chw, decode, transform_into};
use ncp_dataloader::columns::Columns;
use ncp_dataloader::index::build_index;
use ncp_dataloader::item::Location;
use ncp_dataloader::parquet::read_images;
use ncp_dataloader::selection::Selection;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args[1].clone();
    let res: u32 = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(512);
    let bs: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(8);
    let index = build_index(&[path], Columns::with_overrides(&[]).unwrap(), Selection { drop_ties: true, absolute_winners: false }).unwrap();
    let cfg = Config { resolution: res, batch_size: bs, seed: 0, rank: 0, world_size: 1, random_crop: false, random_flip: true,
        strict: false, drop_last: true, empty_prompt_prob: 0.0, shuffle: true };
    let samples = epoch_samples(index.items.len(), &cfg, 0);
    let images = index.columns.images();
    let t = Instant::now();
    let mut all = Vec::new();
    for &s in &samples {
        let item = &index.items[s as usize];
        let Location::Parquet { row_group, row_in_group } = item.location else { panic!() };
        let b = read_images(&index.files[item.file as usize], &images, row_group, &[row_in_group]).unwrap();
        all.push(b.into_iter().next().unwrap());
    }
    let n = samples.len() as f64;
    println!("read per pair (one row group read per pair): {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n);
    let imgs: Vec<Vec<u8>> = all.into_iter().flat_map(|images| images.into_iter().map(Option::unwrap)).collect();
    let m = imgs.len() as f64;
    let mut out = vec![0u8; 3 * (res * res) as usize];
    for _ in 0..2 {
        let t = Instant::now();
        let mut px = Vec::new();
        for b in &imgs { px.push(decode(b).unwrap()); }
        println!("decode (image crate) per image: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / m);
        let t = Instant::now();
        for (i, p) in px.iter().enumerate() { crop_flip_chw(p.view(), 0, 0, res, i % 2 == 0, &mut out); }
        println!("crop/flip/chw per image: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / m);
        let t = Instant::now();
        for (i, b) in imgs.iter().enumerate() { transform_into(b, res, None, i % 2 == 0, &mut out).unwrap(); }
        println!("transform_into (zune direct + crop) per image: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / m);
    }
}
