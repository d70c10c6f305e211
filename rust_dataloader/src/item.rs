//! The one item type: R images of one caption with R labels (R = 2: a preference pair, whose larger
//! label won; R = 1: an unpaired image, labelled 1 desirable or 0 undesirable), as the latent cache's
//! "roles" are. The readers (`parquet`, `jsonl`) yield items in column order; selection sets the order
//! in which a batch holds an item's images (the winner first).
use std::ops::Deref;
use std::path::PathBuf;

/// The most images an item has.
pub const MAX_IMAGES: usize = 2;

/// One value per image of an item (up to `MAX_IMAGES`), kept inline: an index holds millions of items.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerImage<T: Copy + Default> {
    len: u8,
    values: [T; MAX_IMAGES],
}

impl<T: Copy + Default> PerImage<T> {
    /// The values of `v` (at most `MAX_IMAGES`).
    pub fn new(v: &[T]) -> Self {
        assert!(v.len() <= MAX_IMAGES, "an item has at most {MAX_IMAGES} images, got {}", v.len());
        let mut values = [T::default(); MAX_IMAGES];
        values[..v.len()].copy_from_slice(v);
        PerImage { len: v.len() as u8, values }
    }
}

impl<T: Copy + Default> Deref for PerImage<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.values[..self.len as usize]
    }
}

/// Where an item's images are.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    /// A row of a parquet shard: its images are its image columns.
    Parquet { row_group: u32, row_in_group: u32 },
    /// A JSONL line: its image files, in column order (a pair's winner and loser; an unpaired image).
    Paths(Vec<PathBuf>),
}

/// One item of a source file.
#[derive(Debug, Clone)]
pub struct Item {
    /// The file (index into the index's files) and the row in it (a JSONL file: the line, from 0).
    pub file: u32,
    pub row: u64,
    pub location: Location,
    pub caption: String,
    /// One label per image, in column order: a pair's label_0, label_1 (the larger won; a null is NaN);
    /// an unpaired image's 1 (desirable) or 0 (undesirable).
    pub labels: PerImage<f64>,
    /// One uid per image, what absolute winners count (empty unless needed; dropped once selected).
    pub uids: Vec<String>,
    /// The images in batch order, as column indices: winner then loser for a pair, the image for an
    /// unpaired item. Column order until selection sets it.
    pub order: PerImage<u8>,
}

impl Item {
    /// An item in column order (`order` 0, 1, ..).
    pub fn new(file: u32, row: u64, location: Location, caption: String, labels: &[f64], uids: Vec<String>) -> Self {
        let labels = PerImage::new(labels);
        let order = PerImage { len: labels.len, values: std::array::from_fn(|k| k as u8) };
        Item { file, row, location, caption, labels, uids, order }
    }

    /// R: 2 for a pair, 1 for an unpaired image.
    pub fn images(&self) -> usize {
        self.labels.len()
    }

    /// The item's images in batch order (column indices).
    pub fn image_order(&self) -> &[u8] {
        &self.order
    }

    /// An unpaired image's label (None for a pair).
    pub fn desirable(&self) -> Option<bool> {
        (self.images() == 1).then(|| self.labels[0] == 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_image_values_are_a_slice_of_their_length() {
        let p = PerImage::new(&[0.5f64, 0.25]);
        assert_eq!(&*p, &[0.5, 0.25]);
        assert_eq!(PerImage::<u8>::new(&[]).len(), 0);
        assert_eq!(PerImage::new(&[1u8]), PerImage::new(&[1u8]));
        assert!(std::panic::catch_unwind(|| PerImage::new(&[1u8, 2, 3])).is_err());
    }

    #[test]
    fn items_start_in_column_order_and_know_their_label() {
        let pair = Item::new(0, 3, Location::Parquet { row_group: 1, row_in_group: 0 }, "c".into(), &[0.0, 1.0], vec![]);
        assert_eq!((pair.images(), pair.image_order(), pair.desirable()), (2, &[0u8, 1][..], None));
        let paths = Location::Paths(vec![PathBuf::from("a.png")]);
        let good = Item::new(0, 0, paths.clone(), "c".into(), &[1.0], vec![]);
        let bad = Item::new(0, 1, paths, "c".into(), &[0.0], vec![]);
        assert_eq!((good.images(), good.image_order(), good.desirable(), bad.desirable()), (1, &[0u8][..], Some(true), Some(false)));
    }
}
