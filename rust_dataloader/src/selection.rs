//! Which items are kept, and in which order their images go (docs/internals.md, "Pair selection"):
//! ties dropped, the winner first, the NCP paper's absolute-winners filter. An item of one image (unpaired
//! data) is never a tie and is always kept. The Python version and oracle is `ncp.data.pairs.select_pairs`.
use crate::item::{Item, PerImage};
use std::collections::HashMap;

/// Which pairs are kept.
#[derive(Debug, Clone, Copy)]
pub struct Selection {
    pub drop_ties: bool,
    pub absolute_winners: bool,
}

/// What selection saw and dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub rows: usize,
    pub ties: usize,
    pub dropped_ties: usize,
    pub dropped_not_absolute: usize,
}

/// A pair whose two labels are equal.
fn is_tie(r: &Item) -> bool {
    r.labels.len() == 2 && r.labels[0] == r.labels[1]
}

/// Ties, winners and the absolute-winners filter (docs/internals.md, "Pair selection"): the kept items,
/// each with its images in batch order (the winner, the larger label, first; image 0 where a label is NaN, as every
/// comparison with NaN is false) and
/// its uids dropped. `absolute_winners` needs pairs with their uids.
pub fn select(rows: Vec<Item>, sel: Selection) -> (Vec<Item>, Counts) {
    let mut counts = Counts { rows: rows.len(), ties: rows.iter().filter(|r| is_tie(r)).count(), ..Default::default() };
    // (caption, uid) -> (wins, losses, ties) over all rows, ties included.
    let mut record: HashMap<(&str, &str), (u32, u32, u32)> = HashMap::new();
    if sel.absolute_winners {
        for r in &rows {
            let (a, b) = (r.uids[0].as_str(), r.uids[1].as_str());
            let key = |u| (r.caption.as_str(), u);
            if is_tie(r) {
                record.entry(key(a)).or_default().2 += 1;
                record.entry(key(b)).or_default().2 += 1;
            } else {
                let (w, l) = if r.labels[0] > r.labels[1] { (a, b) } else { (b, a) };
                record.entry(key(w)).or_default().0 += 1;
                record.entry(key(l)).or_default().1 += 1;
            }
        }
    }
    // The winner (0 or 1) of each kept row, None for a dropped one.
    let decisions: Vec<Option<u8>> = rows
        .iter()
        .map(|r| {
            if is_tie(r) && (sel.drop_ties || sel.absolute_winners) {
                counts.dropped_ties += 1;
                return None;
            }
            let winner: u8 = if r.labels.len() == 2 && r.labels[1] > r.labels[0] { 1 } else { 0 };
            if sel.absolute_winners {
                let uid = r.uids[winner as usize].as_str();
                let (w, l, t) = record[&(r.caption.as_str(), uid)];
                if l > 0 || t > 0 || w < 2 {
                    counts.dropped_not_absolute += 1;
                    return None;
                }
            }
            Some(winner)
        })
        .collect();
    drop(record);
    let kept = rows
        .into_iter()
        .zip(decisions)
        .filter_map(|(mut r, d)| {
            let winner = d?;
            r.order = match r.images() {
                2 => PerImage::new(&[winner, 1 - winner]),
                _ => PerImage::new(&[0]),
            };
            r.uids = Vec::new();
            Some(r)
        })
        .collect();
    (kept, counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::Location;
    use std::path::PathBuf;

    /// Rows (caption, winner uid or None for a tie, uid_0, uid_1), as tests/test_data.py's ROWS.
    fn rows(spec: &[(&str, Option<&str>, &str, &str)]) -> Vec<Item> {
        spec.iter()
            .enumerate()
            .map(|(i, &(caption, win, u0, u1))| {
                let location = Location::Paths(vec![PathBuf::from(u0), PathBuf::from(u1)]);
                let labels = match win {
                    None => [0.5, 0.5],
                    Some(w) => [(w == u0) as u8 as f64, (w == u1) as u8 as f64],
                };
                Item::new(0, i as u64, location, caption.into(), &labels, vec![u0.into(), u1.into()])
            })
            .collect()
    }

    const ROWS: [(&str, Option<&str>, &str, &str); 6] = [
        ("c", Some("A"), "A", "B"),  // 0: A wins
        ("c", Some("A"), "C", "A"),  // 1: A wins again (as image 1): an absolute winner
        ("c", Some("D"), "D", "B"),  // 2: D wins once ...
        ("c", None, "D", "E"),       // 3: ... and ties: D is out
        ("c", Some("F"), "F", "G"),  // 4: F wins only once
        ("c2", Some("A"), "A", "B"), // 5: A under another caption wins once: out
    ];

    fn kept(spec: &[(&str, Option<&str>, &str, &str)], drop_ties: bool, absolute_winners: bool) -> Vec<(u64, u8)> {
        select(rows(spec), Selection { drop_ties, absolute_winners }).0.iter().map(|p| (p.row, p.image_order()[0])).collect()
    }

    #[test]
    fn ties_are_dropped_and_the_winner_goes_first() {
        assert_eq!(kept(&ROWS, true, false), vec![(0, 0), (1, 1), (2, 0), (4, 0), (5, 0)]);
        assert_eq!(kept(&ROWS, false, false).len(), 6);
        let (kept, counts) = select(rows(&ROWS), Selection { drop_ties: true, absolute_winners: false });
        assert_eq!(counts, Counts { rows: 6, ties: 1, dropped_ties: 1, dropped_not_absolute: 0 });
        assert_eq!(kept[1].image_order(), [1, 0]); // row 1: image 1 won, it goes first
        assert!(kept.iter().all(|p| p.uids.is_empty()));
    }

    #[test]
    fn absolute_winners_never_lost_or_tied_and_won_twice_under_one_caption() {
        assert_eq!(kept(&ROWS, true, true), vec![(0, 0), (1, 1)]);
        assert_eq!(kept(&ROWS, false, true), vec![(0, 0), (1, 1)]); // ties never survive the filter
        let mut lost_once = ROWS.to_vec();
        lost_once.push(("c", Some("B"), "B", "A")); // A lost to B once
        assert_eq!(kept(&lost_once, true, true), vec![]);
    }

    #[test]
    fn absolute_winners_count_and_a_nan_label_leaves_image_0_first() {
        let (_, counts) = select(rows(&ROWS), Selection { drop_ties: true, absolute_winners: true });
        assert_eq!(counts, Counts { rows: 6, ties: 1, dropped_ties: 1, dropped_not_absolute: 3 });
        let mut nan = rows(&ROWS[..1]);
        nan[0].labels = PerImage::new(&[f64::NAN, 1.0]);
        let (kept, counts) = select(nan.clone(), Selection { drop_ties: true, absolute_winners: false });
        assert_eq!((kept[0].image_order(), counts.ties), (&[0u8, 1][..], 0)); // 1.0 > NaN is false
        nan[0].labels = PerImage::new(&[1.0, f64::NAN]);
        assert_eq!(select(nan, Selection { drop_ties: true, absolute_winners: false }).0[0].image_order(), [0, 1]);
    }

    #[test]
    fn unpaired_items_are_never_ties_and_all_kept() {
        let one = |label: f64| Item::new(0, 0, Location::Paths(vec![PathBuf::from("a")]), "c".into(), &[label], vec![]);
        let (kept, counts) = select(vec![one(1.0), one(0.0), one(0.0)], Selection { drop_ties: true, absolute_winners: false });
        assert_eq!(counts, Counts { rows: 3, ..Default::default() });
        assert_eq!(kept.iter().map(|i| (i.image_order().to_vec(), i.desirable())).collect::<Vec<_>>(),
                   vec![(vec![0], Some(true)), (vec![0], Some(false)), (vec![0], Some(false))]);
        assert!(select(vec![], Selection { drop_ties: false, absolute_winners: false }).0.is_empty());
    }
}
