//! Which rows become training pairs (docs/internals.md, "Pair selection"): ties
//! dropped, the winner first, the NCP paper's absolute-winners filter. The Python
//! version and oracle is `ncp.data.pairs.select_pairs`.
use crate::source::{IndexStats, Location, Pair};
use std::collections::HashMap;

/// Which pairs are kept.
#[derive(Debug, Clone, Copy)]
pub struct Selection {
    pub drop_ties: bool,
    pub absolute_winners: bool,
}

/// A row before selection.
pub(crate) struct RawRow {
    pub(crate) file: u32,
    pub(crate) row: u64,
    pub(crate) location: Location,
    pub(crate) caption: String,
    pub(crate) labels: (f64, f64),
    pub(crate) uids: (String, String),
}

/// Ties, winners and the absolute-winners filter (docs/internals.md, "Pair selection").
pub(crate) fn select(rows: Vec<RawRow>, sel: Selection, stats: &mut IndexStats) -> Vec<Pair> {
    stats.rows = rows.len();
    let is_tie = |r: &RawRow| r.labels.0 == r.labels.1;
    stats.ties = rows.iter().filter(|r| is_tie(r)).count();
    // (caption, uid) -> (wins, losses, ties) over all rows, ties included.
    let mut record: HashMap<(&str, &str), (u32, u32, u32)> = HashMap::new();
    if sel.absolute_winners {
        for r in &rows {
            let (a, b) = (r.uids.0.as_str(), r.uids.1.as_str());
            let key = |u| (r.caption.as_str(), u);
            if is_tie(r) {
                record.entry(key(a)).or_default().2 += 1;
                record.entry(key(b)).or_default().2 += 1;
            } else {
                let (w, l) = if r.labels.0 > r.labels.1 { (a, b) } else { (b, a) };
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
                stats.dropped_ties += 1;
                return None;
            }
            let winner: u8 = if r.labels.1 > r.labels.0 { 1 } else { 0 };
            if sel.absolute_winners {
                let uid = if winner == 0 { r.uids.0.as_str() } else { r.uids.1.as_str() };
                let (w, l, t) = record[&(r.caption.as_str(), uid)];
                if l > 0 || t > 0 || w < 2 {
                    stats.dropped_not_absolute += 1;
                    return None;
                }
            }
            Some(winner)
        })
        .collect();
    drop(record);
    rows.into_iter()
        .zip(decisions)
        .filter_map(|(r, d)| {
            d.map(|winner| Pair { file: r.file, row: r.row, location: r.location, winner, caption: r.caption, desirable: None })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Rows (caption, winner uid or None for a tie, uid_0, uid_1), as tests/test_data.py's ROWS.
    fn rows(spec: &[(&str, Option<&str>, &str, &str)]) -> Vec<RawRow> {
        spec.iter()
            .enumerate()
            .map(|(i, &(caption, win, u0, u1))| RawRow {
                file: 0,
                row: i as u64,
                location: Location::Paths { image_0: PathBuf::from(u0), image_1: PathBuf::from(u1) },
                caption: caption.into(),
                labels: match win {
                    None => (0.5, 0.5),
                    Some(w) => ((w == u0) as u8 as f64, (w == u1) as u8 as f64),
                },
                uids: (u0.into(), u1.into()),
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
        let mut stats = IndexStats::default();
        select(rows(spec), Selection { drop_ties, absolute_winners }, &mut stats).iter().map(|p| (p.row, p.winner)).collect()
    }

    #[test]
    fn ties_are_dropped_and_the_winner_goes_first() {
        assert_eq!(kept(&ROWS, true, false), vec![(0, 0), (1, 1), (2, 0), (4, 0), (5, 0)]);
        assert_eq!(kept(&ROWS, false, false).len(), 6);
        let mut stats = IndexStats::default();
        select(rows(&ROWS), Selection { drop_ties: true, absolute_winners: false }, &mut stats);
        assert_eq!((stats.rows, stats.ties, stats.dropped_ties), (6, 1, 1));
    }

    #[test]
    fn absolute_winners_never_lost_or_tied_and_won_twice_under_one_caption() {
        assert_eq!(kept(&ROWS, true, true), vec![(0, 0), (1, 1)]);
        assert_eq!(kept(&ROWS, false, true), vec![(0, 0), (1, 1)]); // ties never survive the filter
        let mut lost_once = ROWS.to_vec();
        lost_once.push(("c", Some("B"), "B", "A")); // A lost to B once
        assert_eq!(kept(&lost_once, true, true), vec![]);
    }
}
