//! Metadata contexts: what `NBD_CMD_BLOCK_STATUS` can report about an export, how a
//! client's queries select them (`NBD_OPT_LIST_META_CONTEXT` / `SET_META_CONTEXT`), and the
//! extents each reports.
//!
//! Every export offers `base:allocation` (holes and zeroes, from the device's
//! [`allocation`](crate::block::BlockDevice::allocation)). An export may also offer dirty
//! bitmaps, `qemu:dirty-bitmap:<name>` in qemu's namespace (its `docs/interop/nbd.rst`):
//! one flag, `NBD_STATE_DIRTY` (bit 0), set on extents written in the bitmap's interval —
//! what qemu's own incremental backups read. A [`DirtyBitmap`] is a fixed set of ranges
//! computed before serving (`mount --changes-since`).
//!
//! Query rules (the NBD spec's "Metadata querying", qemu's for its namespace): a query is
//! `namespace:leaf`; unknown namespaces and leaves select nothing (not an error);
//! `base:`, `qemu:` and `qemu:dirty-bitmap:` are wildcards when listing and select nothing
//! when setting; no query at all lists everything and sets nothing.
//!
//! Must never: report a range clean or a hole that is not (a bitmap's ranges are merged,
//! never trimmed); answer with more than the caller's bound of extents.

use std::ops::Range;
use std::sync::Arc;

use super::NbdError;

/// The allocation context every export offers.
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";
/// Names of dirty bitmap contexts start with this.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// A named set of changed byte ranges, served as `qemu:dirty-bitmap:<name>`.
///
/// # Invariants
/// `ranges` are sorted, non-empty, and neither overlap nor touch (merged).
#[derive(Debug)]
pub struct DirtyBitmap {
    name: String,
    ranges: Vec<Range<u64>>,
}

impl DirtyBitmap {
    /// A bitmap named `name` (the context is `qemu:dirty-bitmap:<name>`) whose dirty bytes
    /// are the union of `ranges` (any order, may overlap).
    pub fn new(
        name: &str,
        ranges: impl IntoIterator<Item = Range<u64>>,
    ) -> Result<DirtyBitmap, NbdError> {
        let context = format!("{DIRTY_BITMAP_PREFIX}{name}");
        let reason = if name.is_empty() {
            Some("empty")
        } else if context.len() > super::protocol::MAX_NAME_LEN {
            Some("the context name would be longer than 4096 bytes")
        } else if name.contains('\0') {
            Some("contains NUL")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(NbdError::BadBitmapName {
                name: name.to_owned(),
                reason,
            });
        }
        let mut sorted: Vec<Range<u64>> = ranges.into_iter().filter(|r| r.start < r.end).collect();
        sorted.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
        for r in sorted {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        Ok(DirtyBitmap {
            name: name.to_owned(),
            ranges: merged,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The merged dirty ranges.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// `offset..offset + len` as consecutive (length, dirty) extents, at most `max` of them
    /// (at least one when `len > 0`).
    pub(crate) fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        // The first range that ends after `offset`.
        let first = self.ranges.partition_point(|r| r.end <= offset);
        for r in &self.ranges[first..] {
            if at >= end || out.len() >= max {
                break;
            }
            if r.start > at {
                let clean = r.start.min(end) - at;
                out.push((clean, false));
                at += clean;
                if at >= end || out.len() >= max {
                    break;
                }
            }
            let dirty = r.end.min(end) - at;
            out.push((dirty, true));
            at += dirty;
        }
        if at < end && out.len() < max {
            out.push((end - at, false));
        }
        out
    }
}

/// One context an export offers.
#[derive(Clone, Debug)]
pub(crate) enum Context {
    Allocation,
    Dirty(Arc<DirtyBitmap>),
}

impl Context {
    pub(crate) fn name(&self) -> String {
        match self {
            Context::Allocation => BASE_ALLOCATION.to_owned(),
            Context::Dirty(b) => format!("{DIRTY_BITMAP_PREFIX}{}", b.name),
        }
    }
}

/// A context chosen for a connection, with the ID its block status chunks carry.
#[derive(Clone, Debug)]
pub(crate) struct Selected {
    pub(crate) id: u32,
    pub(crate) context: Context,
}

/// The contexts `queries` select among `offered` (an export's, in order; IDs are their
/// positions from 1), each once. `listing` is `NBD_OPT_LIST_META_CONTEXT`; otherwise
/// `SET`. `Err` for a query without a namespace.
pub(crate) fn select(
    offered: &[Context],
    queries: &[String],
    listing: bool,
) -> Result<Vec<Selected>, &'static str> {
    let mut chosen = vec![queries.is_empty() && listing; offered.len()];
    for query in queries {
        let Some((namespace, leaf)) = query.split_once(':') else {
            return Err("a query must start with a namespace and a colon");
        };
        if namespace.is_empty() {
            return Err("a query's namespace is empty");
        }
        for (i, context) in offered.iter().enumerate() {
            let hit = match (namespace, context) {
                ("base", Context::Allocation) => {
                    leaf == "allocation" || (listing && leaf.is_empty())
                }
                ("qemu", Context::Dirty(b)) => match leaf.strip_prefix("dirty-bitmap:") {
                    Some(name) => name == b.name || (listing && name.is_empty()),
                    None => listing && leaf.is_empty(),
                },
                _ => false,
            };
            chosen[i] |= hit;
        }
    }
    Ok(offered
        .iter()
        .zip(chosen)
        .enumerate()
        .filter(|(_, (_, c))| *c)
        .map(|(i, (context, _))| Selected {
            id: i as u32 + 1,
            context: context.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered() -> Vec<Context> {
        vec![
            Context::Allocation,
            Context::Dirty(Arc::new(
                DirtyBitmap::new("since-a", std::iter::once(0..512)).unwrap(),
            )),
        ]
    }

    fn names(queries: &[&str], listing: bool) -> Vec<(u32, String)> {
        let queries: Vec<String> = queries.iter().map(|q| q.to_string()).collect();
        select(&offered(), &queries, listing)
            .unwrap()
            .into_iter()
            .map(|s| (s.id, s.context.name()))
            .collect()
    }

    #[test]
    fn queries_select_by_namespace_and_leaf() {
        let both = vec![
            (1, "base:allocation".to_string()),
            (2, "qemu:dirty-bitmap:since-a".to_string()),
        ];
        assert_eq!(names(&[], true), both);
        assert_eq!(names(&[], false), vec![]);
        assert_eq!(names(&["base:", "qemu:"], true), both);
        assert_eq!(names(&["base:", "qemu:"], false), vec![]);
        assert_eq!(names(&["qemu:dirty-bitmap:"], true), both[1..]);
        assert_eq!(
            names(
                &[
                    "qemu:dirty-bitmap:since-a",
                    "base:allocation",
                    "base:allocation"
                ],
                false
            ),
            both
        );
        assert_eq!(names(&["base:allocation"], false), both[..1]);
        // Unknown namespaces and leaves select nothing, without an error.
        assert_eq!(
            names(
                &[
                    "x-foo:bar",
                    "base:nothing",
                    "qemu:dirty-bitmap:other",
                    "qemu:allocation-depth"
                ],
                false
            ),
            vec![]
        );
        let bad = |q: &str| select(&offered(), &[q.to_string()], false).is_err();
        assert!(bad("no-colon"));
        assert!(bad(":allocation"));
    }

    #[test]
    fn bitmaps_merge_and_answer_within_bounds() {
        let b = DirtyBitmap::new("b", [4096..8192, 0..512, 8192..9000, 20000..20000]).unwrap();
        assert_eq!(b.ranges(), &[0..512, 4096..9000]);
        assert_eq!(
            b.extents(0, 10000, 100),
            [(512, true), (3584, false), (4904, true), (1000, false)]
        );
        assert_eq!(
            b.extents(256, 4096, 100),
            [(256, true), (3584, false), (256, true)]
        );
        assert_eq!(b.extents(0, 10000, 2), [(512, true), (3584, false)]);
        assert_eq!(b.extents(9000, 1000, 1), [(1000, false)]);
        assert_eq!(b.extents(5000, 10, 1), [(10, true)]);
        assert!(DirtyBitmap::new("", std::iter::once(0..1)).is_err());
        assert!(DirtyBitmap::new(&"x".repeat(4096), std::iter::once(0..1)).is_err());
    }
}
