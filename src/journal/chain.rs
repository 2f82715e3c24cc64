//! The epoch chain: where each writer epoch's records begin, which prefix of its predecessor
//! it continues, and from that the **lineage** — the LSNs a reader applies — and the
//! **branches** — records a `promote --at` left off the chain, kept by name.
//!
//! A writer writes its epoch's entry (`chain/<epoch:020>`, conditional create, never
//! replaced) after it has planned and before its first segment, so an entry exists for
//! every epoch that holds a record. LSNs keep increasing along the seqs across epochs (a new
//! writer continues at the journal's end), so an LSN names one record; a fork is an entry
//! whose predecessor LSN is below its own first LSN − 1, and the records between are a
//! branch. Journals written before the chain existed have no entries: an epoch without one
//! continues everything before it.
//!
//! Must never: replace an entry or a branch; put a record of a branch on the lineage (a
//! reader that applied one must wind it back or stop); fork from a point off the lineage.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::epoch::{self, EpochClaim, EpochReason, Predecessor};
use super::error::{JournalError, JournalResult};
use super::paths;
use crate::store::{list_all, ObjectStore};

/// One epoch's place in the chain (JSON at `chain/<epoch:020>`).
///
/// ```json
/// {"epoch":4,"first_seq":120,"first_lsn":9001,"predecessor":{"epoch":3,"lsn":8500},
///  "reason":"promote-at","owner":"siteb","host":"b1","began_at_ns":1765000000000000000}
/// ```
///
/// `first_seq`/`first_lsn` are the epoch's first segment (its `EPOCH` record). `predecessor`
/// is the epoch this one continues and the last LSN of it that the new owner's image
/// contains; `None` only for the journal's first epoch. For every reason but `promote --at`
/// it is the journal's end as the writer planned it (`first_lsn − 1`), so nothing is cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainEntry {
    pub epoch: u64,
    pub first_seq: u64,
    pub first_lsn: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predecessor: Option<Predecessor>,
    #[serde(default)]
    pub reason: EpochReason,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
    #[serde(default)]
    pub host: String,
    pub began_at_ns: u64,
}

impl ChainEntry {
    /// The LSNs of the predecessor this entry cuts off (`pred.lsn + 1 ..= first_lsn − 1`),
    /// `None` when it continues the journal's end.
    pub fn cut(&self) -> Option<(u64, u64)> {
        let pred = self.predecessor?;
        (pred.lsn + 1 < self.first_lsn).then(|| (pred.lsn + 1, self.first_lsn - 1))
    }
}

/// A branch: records `from_lsn..=to_lsn` (segments `first_seq..=last_seq`) that the fork of
/// epoch `forked_by` left off the chain. JSON at `branches/<name>`; trim keeps its segments
/// until `journal trim --drop-branch NAME`; `restore`/`mount --branch NAME` read the state at
/// its end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    pub name: String,
    pub forked_by: u64,
    pub from_lsn: u64,
    pub to_lsn: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub created_at_ns: u64,
}

/// The LSNs a reader applies: sorted, disjoint inclusive ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lineage {
    ranges: Vec<(u64, u64)>,
}

impl Lineage {
    /// Every LSN (a journal with no fork).
    pub fn everything() -> Lineage {
        Lineage {
            ranges: vec![(0, u64::MAX)],
        }
    }

    /// Whether the record with `lsn` is on the lineage.
    pub fn contains(&self, lsn: u64) -> bool {
        let i = self.ranges.partition_point(|&(_, hi)| hi < lsn);
        self.ranges.get(i).is_some_and(|&(lo, _)| lo <= lsn)
    }

    /// The LSNs left off the lineage below `end` (inclusive ranges), for reports.
    pub fn cuts_below(&self, end: u64) -> Vec<(u64, u64)> {
        let mut cuts = Vec::new();
        let mut next = 0u64;
        for &(lo, hi) in &self.ranges {
            if lo > next && next <= end {
                cuts.push((next, (lo - 1).min(end)));
            }
            next = hi.saturating_add(1);
            if hi == u64::MAX {
                break;
            }
        }
        cuts
    }

    /// The last LSN at or below `lsn` that is on the lineage (where a reader that applied
    /// `lsn` must wind back to), `None` when there is none.
    pub fn last_at_or_below(&self, lsn: u64) -> Option<u64> {
        let i = self.ranges.partition_point(|&(lo, _)| lo <= lsn);
        let (_, hi) = *self.ranges.get(i.checked_sub(1)?)?;
        Some(hi.min(lsn))
    }

    /// The first LSN at or after `lsn` that is on the lineage, `None` when there is none.
    pub fn next_at_or_after(&self, lsn: u64) -> Option<u64> {
        let i = self.ranges.partition_point(|&(_, hi)| hi < lsn);
        self.ranges.get(i).map(|&(lo, _)| lo.max(lsn))
    }

    /// The first LSN at or below `upto` that one lineage holds and the other does not
    /// (`None`: they agree on `0..=upto`). A reader that applied `self` up to `upto` and
    /// learns `other` must wind back to just before it.
    pub fn first_difference(&self, other: &Lineage, upto: u64) -> Option<u64> {
        // Membership only changes at a range's ends, so the first difference is at one.
        let mut edges: Vec<u64> = vec![0];
        for &(lo, hi) in self.ranges.iter().chain(other.ranges.iter()) {
            edges.push(lo);
            edges.push(hi.saturating_add(1));
        }
        edges.sort_unstable();
        edges.dedup();
        edges
            .into_iter()
            .take_while(|&e| e <= upto)
            .find(|&e| self.contains(e) != other.contains(e))
    }

    /// The inclusive ranges of the lineage (for reports and tests).
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// The first LSN of this lineage that `other` does not hold, `None` when `other` holds
    /// every one (where an old owner's chain leaves the current one: `rejoin`'s fork).
    pub fn first_not_in(&self, other: &Lineage) -> Option<u64> {
        for &(lo, hi) in &self.ranges {
            let i = other.ranges.partition_point(|&(_, ohi)| ohi < lo);
            match other.ranges.get(i) {
                Some(&(olo, ohi)) if olo <= lo => {
                    if ohi < hi {
                        return Some(ohi + 1);
                    }
                }
                _ => return Some(lo),
            }
        }
        None
    }

    fn from_ranges(mut ranges: Vec<(u64, u64)>) -> Lineage {
        ranges.retain(|&(lo, hi)| lo <= hi);
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Lineage { ranges: merged }
    }
}

/// Every claim and chain entry of a journal (one LIST of `epochs/` and of `chain/`, a GET
/// of each: both hold one object per writer start and stay small).
#[derive(Clone, Debug, Default)]
pub struct Chain {
    pub claims: BTreeMap<u64, EpochClaim>,
    pub entries: BTreeMap<u64, ChainEntry>,
}

impl Chain {
    /// The entry of the highest epoch that began writing.
    pub fn head(&self) -> Option<&ChainEntry> {
        self.entries.values().next_back()
    }

    /// The lineage of the current chain (its head epoch, every record from its start on).
    pub fn lineage(&self) -> Lineage {
        match self.head() {
            Some(head) => self.lineage_to(head.epoch, u64::MAX),
            None => Lineage::everything(),
        }
    }

    /// The lineage of the chain as it stood while `epoch` was its head, cut at `end_lsn`:
    /// what a branch left by a later fork reads.
    pub fn lineage_to(&self, epoch: u64, end_lsn: u64) -> Lineage {
        let mut ranges = Vec::new();
        let mut hi = end_lsn;
        let mut cur = self.entries.get(&epoch);
        loop {
            let Some(entry) = cur else {
                // No entry (the first epoch, or a journal older than the chain): everything
                // before continues.
                ranges.push((0, hi));
                break;
            };
            ranges.push((entry.first_lsn, hi));
            let Some(pred) = entry.predecessor else {
                ranges.push((0, entry.first_lsn.saturating_sub(1)));
                break;
            };
            if entry.first_lsn == 0 {
                break;
            }
            hi = pred.lsn.min(entry.first_lsn - 1);
            cur = self.entries.get(&pred.epoch);
            if cur.is_none() {
                ranges.push((0, hi));
                break;
            }
        }
        Lineage::from_ranges(ranges)
    }

    /// The entry whose epoch begins at `lsn` (where a reader resumes after a cut).
    pub fn entry_starting_at(&self, lsn: u64) -> Option<&ChainEntry> {
        self.entries.values().find(|e| e.first_lsn == lsn)
    }

    /// The epoch of the current head (0 for a journal without entries).
    pub fn head_epoch(&self) -> u64 {
        self.head().map_or(0, |h| h.epoch)
    }

    /// The epoch whose records hold `lsn` on the current lineage (`None` before the first
    /// entry or in a cut).
    pub fn epoch_of(&self, lsn: u64) -> Option<u64> {
        self.entries
            .values()
            .rev()
            .find(|e| e.first_lsn <= lsn)
            .map(|e| e.epoch)
    }
}

/// One epoch as `journal info` and `timeline` show it: its claim, and where it began (absent
/// for an epoch claimed that never wrote: a writer that died before its first segment).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EpochReport {
    pub epoch: u64,
    pub reason: EpochReason,
    pub owner: String,
    pub host: String,
    pub claimed_at_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_lsn: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predecessor: Option<Predecessor>,
    /// The LSNs this epoch's fork left off the chain (`promote --at`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut: Option<(u64, u64)>,
}

/// The chain and its branches, for reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub epochs: Vec<EpochReport>,
    pub branches: Vec<Branch>,
    /// The LSN ranges (inclusive) off the current lineage.
    pub off_lineage: Vec<(u64, u64)>,
}

impl ChainReport {
    /// The report of `chain` and `branches`; `end` bounds the cuts listed (the head LSN).
    pub fn new(chain: &Chain, branches: Vec<Branch>, end: u64) -> ChainReport {
        let mut epochs: BTreeMap<u64, EpochReport> = chain
            .claims
            .values()
            .map(|c| {
                (
                    c.epoch,
                    EpochReport {
                        epoch: c.epoch,
                        reason: c.reason,
                        owner: c.owner.clone(),
                        host: c.host.clone(),
                        claimed_at_ns: c.claimed_at_ns,
                        first_seq: None,
                        first_lsn: None,
                        predecessor: c.fork,
                        cut: None,
                    },
                )
            })
            .collect();
        for e in chain.entries.values() {
            let report = epochs.entry(e.epoch).or_insert_with(|| EpochReport {
                epoch: e.epoch,
                reason: e.reason,
                owner: e.owner.clone(),
                host: e.host.clone(),
                claimed_at_ns: e.began_at_ns,
                first_seq: None,
                first_lsn: None,
                predecessor: None,
                cut: None,
            });
            report.first_seq = Some(e.first_seq);
            report.first_lsn = Some(e.first_lsn);
            report.predecessor = e.predecessor;
            report.cut = e.cut();
        }
        ChainReport {
            epochs: epochs.into_values().collect(),
            branches,
            off_lineage: chain.lineage().cuts_below(end),
        }
    }

    /// One line per epoch and per branch, for text reports.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.epochs {
            let start = match (e.first_seq, e.first_lsn) {
                (Some(seq), Some(lsn)) => format!("from seq {seq}, LSN {lsn}"),
                _ => "claimed, never wrote".to_string(),
            };
            let pred = e.predecessor.map_or(String::new(), |p| {
                format!(", continues epoch {} at LSN {}", p.epoch, p.lsn)
            });
            let cut = e.cut.map_or(String::new(), |(lo, hi)| {
                format!(", leaves LSNs {lo}..={hi} off the chain")
            });
            let owner = if e.owner.is_empty() {
                String::new()
            } else {
                format!(" by {}", e.owner)
            };
            out.push(format!(
                "epoch {} ({}{owner} on {}): {start}{pred}{cut}",
                e.epoch,
                e.reason.name(),
                if e.host.is_empty() { "?" } else { &e.host }
            ));
        }
        for b in &self.branches {
            out.push(format!(
                "branch {}: LSNs {}..={} (seqs {}..={}), left by epoch {}'s fork; kept until `journal trim --drop-branch {}`",
                b.name, b.from_lsn, b.to_lsn, b.first_seq, b.last_seq, b.forked_by, b.name
            ));
        }
        out
    }
}

/// [`load`]s the chain and lists the branches, as a report.
pub async fn report(store: &dyn ObjectStore, end: u64) -> JournalResult<ChainReport> {
    let chain = load(store).await?;
    let branches = list_branches(store).await?;
    Ok(ChainReport::new(&chain, branches, end))
}

/// Writes the entry of a beginning epoch (conditional create: an entry is never replaced).
pub async fn write_entry(store: &dyn ObjectStore, entry: &ChainEntry) -> JournalResult<()> {
    let body = serde_json::to_vec(entry).expect("a chain entry always serializes");
    store
        .put_if_absent(&paths::chain_key(entry.epoch), Bytes::from(body))
        .await
        .map_err(Into::into)
}

/// Loads every claim and chain entry.
pub async fn load(store: &dyn ObjectStore) -> JournalResult<Chain> {
    let mut chain = Chain::default();
    for object in list_all(store, paths::EPOCHS_PREFIX).await? {
        if let Some(epoch) = paths::parse_epoch_key(&object.key) {
            chain
                .claims
                .insert(epoch, epoch::read_claim(store, epoch).await?);
        }
    }
    for object in list_all(store, paths::CHAIN_PREFIX).await? {
        if let Some(epoch) = paths::parse_chain_key(&object.key) {
            if let Some(entry) = read_entry(store, epoch).await? {
                chain.entries.insert(epoch, entry);
            }
        }
    }
    Ok(chain)
}

/// Reads the entry of `epoch`; `None` when that epoch never began writing (or the journal
/// predates the chain).
pub async fn read_entry(store: &dyn ObjectStore, epoch: u64) -> JournalResult<Option<ChainEntry>> {
    let key = paths::chain_key(epoch);
    let data = match store.get(&key).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let entry: ChainEntry = serde_json::from_slice(&data).map_err(|e| JournalError::Malformed {
        journal: store.describe(),
        key: key.clone(),
        what: "epoch chain entry",
        reason: e.to_string(),
    })?;
    if entry.epoch != epoch {
        return Err(JournalError::Malformed {
            journal: store.describe(),
            key,
            what: "epoch chain entry",
            reason: format!("it names epoch {}", entry.epoch),
        });
    }
    Ok(Some(entry))
}

/// Creates a branch (conditional create: a name is used once).
pub async fn create_branch(store: &dyn ObjectStore, branch: &Branch) -> JournalResult<()> {
    let body = serde_json::to_vec(branch).expect("a branch always serializes");
    store
        .put_if_absent(&paths::branch_key(&branch.name), Bytes::from(body))
        .await
        .map_err(Into::into)
}

/// Every branch, by name.
pub async fn list_branches(store: &dyn ObjectStore) -> JournalResult<Vec<Branch>> {
    let mut out = Vec::new();
    for object in list_all(store, paths::BRANCHES_PREFIX).await? {
        let Some(name) = paths::parse_branch_key(&object.key) else {
            continue;
        };
        let data = store.get(&object.key).await?;
        let branch: Branch =
            serde_json::from_slice(&data).map_err(|e| JournalError::Malformed {
                journal: store.describe(),
                key: object.key.clone(),
                what: "branch",
                reason: e.to_string(),
            })?;
        if branch.name == name {
            out.push(branch);
        }
    }
    Ok(out)
}

/// Deletes a branch's object (its segments go with the next trim that passes them).
pub async fn drop_branch(store: &dyn ObjectStore, name: &str) -> JournalResult<()> {
    store
        .delete_many(&[paths::branch_key(name)])
        .await
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn entry(epoch: u64, first_lsn: u64, pred: Option<(u64, u64)>) -> ChainEntry {
        ChainEntry {
            epoch,
            first_seq: first_lsn,
            first_lsn,
            predecessor: pred.map(|(epoch, lsn)| Predecessor { epoch, lsn }),
            reason: EpochReason::Start,
            owner: String::new(),
            host: String::new(),
            began_at_ns: 0,
        }
    }

    fn chain(entries: Vec<ChainEntry>) -> Chain {
        Chain {
            claims: BTreeMap::new(),
            entries: entries.into_iter().map(|e| (e.epoch, e)).collect(),
        }
    }

    #[test]
    fn a_chain_without_forks_keeps_every_lsn() {
        let c = chain(vec![
            entry(1, 0, None),
            entry(2, 50, Some((1, 49))),
            entry(3, 90, Some((2, 89))),
        ]);
        assert_eq!(c.lineage(), Lineage::everything());
        assert!(c.lineage().cuts_below(1000).is_empty());
    }

    #[test]
    fn a_fork_cuts_the_branch_and_a_later_fork_can_cut_a_whole_epoch() {
        // E2 forked from E1 at 30 (E1's 31..=49 are a branch); E3 forked from E2 at 60.
        let c = chain(vec![
            entry(1, 0, None),
            entry(2, 50, Some((1, 30))),
            entry(3, 90, Some((2, 60))),
        ]);
        let l = c.lineage();
        assert!(l.contains(30) && !l.contains(31) && !l.contains(49));
        assert!(l.contains(50) && l.contains(60) && !l.contains(61) && !l.contains(89));
        assert!(l.contains(90) && l.contains(u64::MAX));
        assert_eq!(l.cuts_below(100), vec![(31, 49), (61, 89)]);
        assert_eq!(l.last_at_or_below(45), Some(30));
        assert_eq!(l.last_at_or_below(70), Some(60));
        // The branch E3 left: E2's chain up to 89.
        let b = c.lineage_to(2, 89);
        assert!(b.contains(70) && b.contains(89) && !b.contains(40) && !b.contains(90));
        // A fork back over a whole epoch: E3 forked from E1 at 20; E2 is off the lineage.
        let c = chain(vec![
            entry(1, 0, None),
            entry(2, 50, Some((1, 49))),
            entry(3, 90, Some((1, 20))),
        ]);
        assert_eq!(c.lineage().cuts_below(u64::MAX), vec![(21, 89)]);
        // The old owner of E2 (its lineage up to 89) left the current chain after 20.
        assert_eq!(c.lineage_to(2, 89).first_not_in(&c.lineage()), Some(21));
        assert_eq!(c.lineage_to(1, 20).first_not_in(&c.lineage()), None);
    }

    #[test]
    fn a_reader_finds_where_its_lineage_and_a_new_one_part() {
        let before = chain(vec![entry(1, 0, None)]);
        let after = chain(vec![entry(1, 0, None), entry(2, 50, Some((1, 30)))]);
        let (old, new) = (before.lineage(), after.lineage());
        // Applied up to 45: records 31..=45 are off the new lineage.
        assert_eq!(old.first_difference(&new, 45), Some(31));
        // Applied only up to 30: nothing to wind back.
        assert_eq!(old.first_difference(&new, 30), None);
        assert_eq!(new.next_at_or_after(31), Some(50));
        assert_eq!(new.next_at_or_after(12), Some(12));
        assert_eq!(after.entry_starting_at(50).map(|e| e.epoch), Some(2));
        // A reader that already followed the fork (lineage_to the head) sees no difference.
        assert_eq!(
            new.first_difference(&after.lineage_to(2, u64::MAX), 1000),
            None
        );
        // An old reader's lineage is everything (no entry for epoch 0).
        assert_eq!(after.lineage_to(0, u64::MAX), Lineage::everything());
    }

    #[test]
    fn a_journal_older_than_the_chain_continues_everything() {
        // Epochs 1 and 2 wrote no entry; epoch 3 continues epoch 2 at 70.
        let c = chain(vec![entry(3, 71, Some((2, 70)))]);
        assert_eq!(c.lineage(), Lineage::everything());
    }

    #[tokio::test]
    async fn entries_and_branches_are_created_once_and_read_back() {
        let store = MemoryStore::new();
        let e = entry(1, 0, None);
        write_entry(&store, &e).await.unwrap();
        assert!(write_entry(&store, &e).await.is_err());
        assert_eq!(read_entry(&store, 1).await.unwrap(), Some(e.clone()));
        assert_eq!(read_entry(&store, 2).await.unwrap(), None);
        let b = Branch {
            name: "before-e2".into(),
            forked_by: 2,
            from_lsn: 31,
            to_lsn: 49,
            first_seq: 3,
            last_seq: 5,
            created_at_ns: 7,
        };
        create_branch(&store, &b).await.unwrap();
        assert!(create_branch(&store, &b).await.is_err());
        assert_eq!(list_branches(&store).await.unwrap(), vec![b]);
        drop_branch(&store, "before-e2").await.unwrap();
        assert!(list_branches(&store).await.unwrap().is_empty());
        let loaded = load(&store).await.unwrap();
        assert_eq!(loaded.head(), Some(&e));
    }
}
