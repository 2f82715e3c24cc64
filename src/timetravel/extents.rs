//! The extent map of `mount --at`: for every byte of the device, where its content as of
//! the point comes from — a record's payload in an undo segment or a journal segment, zeroes,
//! or (unmapped) the replica. It holds locations (seq + index entry), never payloads.
//!
//! Must never: let two extents overlap.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::journal::segment::IndexEntry;

/// Which store a payload is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Layer {
    Undo,
    Journal,
}

/// A record whose payload holds some bytes: byte `x` of the view is payload byte
/// `x - start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Location {
    pub layer: Layer,
    pub seq: u64,
    pub entry: IndexEntry,
    /// Where the record's first byte is in the view's space: `entry.offset`, or for a group
    /// journal's record its device's base plus that (the index keeps device offsets).
    pub start: u64,
}

/// Where an extent's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// They read as zeroes.
    Zero,
    /// From a record's payload.
    Payload(Arc<Location>),
}

/// Non-overlapping extents `start -> (end, source)`; a byte in none comes from the replica.
/// The object replica's lazy mount (`objrep::view`) keeps its own kind of source in one.
///
/// # Invariants
/// Extents do not overlap and are never empty.
#[derive(Debug)]
pub(crate) struct ExtentMap<S = Source> {
    map: BTreeMap<u64, (u64, S)>,
}

impl<S> Default for ExtentMap<S> {
    fn default() -> Self {
        ExtentMap {
            map: BTreeMap::new(),
        }
    }
}

impl<S: Clone> ExtentMap<S> {
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Removes every extent's part inside `start..end`.
    fn cut(&mut self, start: u64, end: u64) {
        let mut hit: Vec<u64> = Vec::new();
        if let Some((&k, &(e, _))) = self.map.range(..start).next_back() {
            if e > start {
                hit.push(k);
            }
        }
        hit.extend(self.map.range(start..end).map(|(&k, _)| k));
        for k in hit {
            let (e, src) = self.map.remove(&k).expect("listed");
            if k < start {
                self.map.insert(k, (start, src.clone()));
            }
            if e > end {
                self.map.insert(end, (e, src));
            }
        }
    }

    /// `start..end` comes from `source`, whatever was mapped there (a later record wins).
    pub(crate) fn overwrite(&mut self, start: u64, end: u64, source: S) {
        if start >= end {
            return;
        }
        self.cut(start, end);
        self.map.insert(start, (end, source));
    }

    /// The unmapped parts of `start..end` come from `source` (an earlier record wins).
    pub(crate) fn fill_gaps(&mut self, start: u64, end: u64, source: S) {
        let gaps: Vec<(u64, u64)> = self
            .pieces(start, end)
            .into_iter()
            .filter(|(_, _, s)| s.is_none())
            .map(|(s, e, _)| (s, e))
            .collect();
        for (s, e) in gaps {
            self.map.insert(s, (e, source.clone()));
        }
    }

    /// `Some(source)` when all of `start..end` (not empty) has one source (`None`: the
    /// replica), from one descent of the tree and without allocating; `None` when it spans
    /// several pieces (then [`pieces`](Self::pieces)). A mount's 4 KiB read is nearly always
    /// one piece, and building the `Vec` of `pieces` cost 7% of its CPU (bench/profile/).
    pub(crate) fn whole(&self, start: u64, end: u64) -> Option<Option<S>> {
        // The last extent starting before `end`: extents do not overlap, so when it ends at
        // or before `start`, every earlier one does too.
        match self.map.range(..end).next_back() {
            None => Some(None),
            Some((_, (e, _))) if *e <= start => Some(None),
            Some((&k, (e, src))) if k <= start && *e >= end => Some(Some(src.clone())),
            Some(_) => None,
        }
    }

    /// `start..end` cut into consecutive pieces with their source (`None`: the replica).
    pub(crate) fn pieces(&self, start: u64, end: u64) -> Vec<(u64, u64, Option<S>)> {
        let mut out = Vec::new();
        let mut at = start;
        let before = self
            .map
            .range(..start)
            .next_back()
            .filter(|(_, (e, _))| *e > start);
        for (&k, (e, src)) in before.into_iter().chain(self.map.range(start..end)) {
            let k = k.max(start);
            if k > at {
                out.push((at, k, None));
            }
            let piece_end = (*e).min(end);
            out.push((k, piece_end, Some(src.clone())));
            at = piece_end;
        }
        if at < end {
            out.push((at, end, None));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::RecordKind;

    fn loc(seq: u64) -> Source {
        Source::Payload(Arc::new(Location {
            layer: Layer::Undo,
            seq,
            entry: IndexEntry {
                lsn: seq,
                timestamp_ns: 0,
                kind: RecordKind::Write,
                dev: 0,
                offset: 0,
                length: 0,
                body_pos: 0,
                stored_len: 0,
                crc: 0,
                compressed: false,
                seal: None,
            },
            start: 0,
        }))
    }

    fn seqs(m: &ExtentMap, start: u64, end: u64) -> Vec<(u64, u64, Option<u64>)> {
        m.pieces(start, end)
            .into_iter()
            .map(|(s, e, src)| {
                (
                    s,
                    e,
                    src.map(|x| match x {
                        Source::Zero => 0,
                        Source::Payload(l) => l.seq,
                    }),
                )
            })
            .collect()
    }

    #[test]
    fn later_overwrites_win_earlier_fills_keep() {
        let mut m = ExtentMap::default();
        m.overwrite(10, 20, loc(1));
        m.overwrite(15, 30, loc(2));
        assert_eq!(
            seqs(&m, 0, 40),
            [
                (0, 10, None),
                (10, 15, Some(1)),
                (15, 30, Some(2)),
                (30, 40, None)
            ]
        );
        m.overwrite(12, 13, Source::Zero);
        assert_eq!(
            seqs(&m, 11, 16),
            [
                (11, 12, Some(1)),
                (12, 13, Some(0)),
                (13, 15, Some(1)),
                (15, 16, Some(2))
            ]
        );
        m.fill_gaps(0, 40, loc(9));
        assert_eq!(
            seqs(&m, 0, 40),
            [
                (0, 10, Some(9)),
                (10, 12, Some(1)),
                (12, 13, Some(0)),
                (13, 15, Some(1)),
                (15, 30, Some(2)),
                (30, 40, Some(9))
            ]
        );
        assert_eq!(m.len(), 6);
    }

    /// `whole` agrees with `pieces` wherever `pieces` gives one piece, and says `None`
    /// wherever it gives more, over every range of a small map with gaps and neighbours.
    #[test]
    fn whole_is_pieces_when_there_is_one() {
        let mut m = ExtentMap::default();
        m.overwrite(10, 20, loc(1));
        m.overwrite(20, 25, loc(2));
        m.overwrite(30, 40, Source::Zero);
        let tag = |src: Option<Source>| {
            src.map(|x| match x {
                Source::Zero => 0,
                Source::Payload(l) => l.seq,
            })
        };
        for start in 0..45 {
            for end in start + 1..46 {
                let pieces = seqs(&m, start, end);
                let whole = m.whole(start, end).map(tag);
                if let [(_, _, one)] = pieces.as_slice() {
                    assert_eq!(whole, Some(*one), "{start}..{end}");
                } else {
                    assert_eq!(whole, None, "{start}..{end}: {pieces:?}");
                }
            }
        }
        assert_eq!(
            ExtentMap::<Source>::default().whole(0, 8).map(tag),
            Some(None)
        );
    }
}
