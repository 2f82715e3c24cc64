//! Every object key under a journal root, formatted in one place.
//!
//! Must never: be bypassed. No other module builds a journal key with `format!`; a key
//! that is formatted twice is a key that will one day be formatted two ways.
//!
//! ```text
//! tinylag.json                   manifest
//! epochs/<epoch:020>             writer claims
//! journal/<seq % W>/<seq:020>    segments
//! consumers/<name>               commit position of each consumer
//! trim                           first live seq
//! trim.pending                   the seqs an unfinished trim is deleting (below `trim`)
//! marks/<name>                   a named point (LSN, time), kept after its segment is trimmed
//! leases/<epoch:020>             the lease of writer epoch <epoch>, renewed by that writer only
//! chain/<epoch:020>              where epoch <epoch> begins and which prefix of its predecessor it continues
//! branches/<name>                a branch: records a `promote --at` left off the chain, kept until dropped
//! requests/resync/<name>         regions a rejoining replica asks the writer to journal as a resync span
//! requests/resync.pending        the doorbell: exists while a request may be unseen by the writer
//! ```
//!
//! An undo log (a replay agent's pre-images, in its own store root) has its own two names:
//!
//! ```text
//! undo.json                      undo-log manifest (journal UUID, consumer, replica, size)
//! undo/<seq:020>                 undo segments, one per applied batch
//! trim                           first live undo seq (same format as the journal's)
//! trim.pending                   the undo seqs an unfinished undo trim is deleting
//! ```
//!
//! An object replica (`crate::objrep`, its own store root) has its own names, in [`objrep`]:
//!
//! ```text
//! objrep.json                                          identity (journal UUID, consumer, size)
//! layers/<gen:020>-<first:020>-<last:020>-<run:016x>   delta layers
//! checkpoints/<gen:020>                                manifest generations; the highest is current
//! ```

/// The manifest, written once by conditional create.
pub const MANIFEST: &str = "tinylag.json";
/// Folder of writer epoch claims.
pub const EPOCHS_PREFIX: &str = "epochs/";
/// Folder of consumer positions.
pub const CONSUMERS_PREFIX: &str = "consumers/";
/// Folder of segment stripes.
pub const JOURNAL_PREFIX: &str = "journal/";
/// The first live seq.
pub const TRIM_POINTER: &str = "trim";
/// The seqs an unfinished trim is deleting, all below [`TRIM_POINTER`] (see `crate::trim`).
pub const TRIM_PENDING: &str = "trim.pending";
/// Folder of named points (marks).
pub const MARKS_PREFIX: &str = "marks/";

/// Folder of writer leases, one key per epoch (see `journal::lease` for why not one key).
pub const LEASES_PREFIX: &str = "leases/";

/// Folder of epoch chain entries (see `journal::chain`).
pub const CHAIN_PREFIX: &str = "chain/";
/// Folder of branches (see `journal::chain`).
pub const BRANCHES_PREFIX: &str = "branches/";
/// Folder of devices added to a group after `init` (see `journal::manifest`).
pub const DEVICES_PREFIX: &str = "devices/";
/// Folder of resync requests from rejoining replicas to the writer.
pub const RESYNC_REQUESTS_PREFIX: &str = "requests/resync/";
/// The resync requests' doorbell: a rejoin puts it after its request, the writer looks for
/// it (one HEAD a renewal) and lists the requests only when it rings. Outside the requests'
/// folder, so it is never listed as one.
pub const RESYNC_DOORBELL: &str = "requests/resync.pending";

/// The undo-log manifest, written once by conditional create.
pub const UNDO_MANIFEST: &str = "undo.json";
/// Folder of undo segments.
pub const UNDO_PREFIX: &str = "undo/";

/// Key of writer epoch `epoch`.
pub fn epoch_key(epoch: u64) -> String {
    format!("{EPOCHS_PREFIX}{epoch:020}")
}

/// Parses an epoch key back to its number; `None` for anything else.
pub fn parse_epoch_key(key: &str) -> Option<u64> {
    parse_padded(key.strip_prefix(EPOCHS_PREFIX)?)
}

/// Key of the chain entry of epoch `epoch`.
pub fn chain_key(epoch: u64) -> String {
    format!("{CHAIN_PREFIX}{epoch:020}")
}

/// Parses a chain entry key back to its epoch.
pub fn parse_chain_key(key: &str) -> Option<u64> {
    parse_padded(key.strip_prefix(CHAIN_PREFIX)?)
}

/// Key of branch `name` (names follow [`valid_consumer_name`]).
pub fn branch_key(name: &str) -> String {
    format!("{BRANCHES_PREFIX}{name}")
}

/// Parses a branch key back to the name.
pub fn parse_branch_key(key: &str) -> Option<&str> {
    key.strip_prefix(BRANCHES_PREFIX)
        .filter(|n| valid_consumer_name(n))
}

/// Key of the resync request of consumer `name`.
pub fn resync_request_key(name: &str) -> String {
    format!("{RESYNC_REQUESTS_PREFIX}{name}")
}

/// Parses a resync request key back to the consumer's name.
pub fn parse_resync_request_key(key: &str) -> Option<&str> {
    key.strip_prefix(RESYNC_REQUESTS_PREFIX)
        .filter(|n| valid_consumer_name(n))
}

/// Key of the device added at `index` (`journal add-device`).
pub fn device_key(index: usize) -> String {
    format!("{DEVICES_PREFIX}{index:04}")
}

/// Key of the lease of writer `epoch`.
pub fn lease_key(epoch: u64) -> String {
    format!("{LEASES_PREFIX}{epoch:020}")
}

/// Stripe (folder) of segment `seq` with splay width `splay`.
pub fn stripe_of(seq: u64, splay: u32) -> u64 {
    seq % u64::from(splay.max(1))
}

/// Key of segment `seq` with splay width `splay`.
pub fn segment_key(seq: u64, splay: u32) -> String {
    format!("{JOURNAL_PREFIX}{}/{seq:020}", stripe_of(seq, splay))
}

/// Prefix of one stripe's segments.
pub fn stripe_prefix(stripe: u64) -> String {
    format!("{JOURNAL_PREFIX}{stripe}/")
}

/// Parses a segment key back to its seq, checking it sits in the right stripe.
pub fn parse_segment_key(key: &str, splay: u32) -> Option<u64> {
    let rest = key.strip_prefix(JOURNAL_PREFIX)?;
    let (stripe, seq) = rest.split_once('/')?;
    let seq = parse_padded(seq)?;
    (stripe.parse::<u64>().ok()? == stripe_of(seq, splay)).then_some(seq)
}

/// Key of consumer `name`. Names are checked by [`valid_consumer_name`] first.
pub fn consumer_key(name: &str) -> String {
    format!("{CONSUMERS_PREFIX}{name}")
}

/// Parses a consumer key back to the name.
pub fn parse_consumer_key(key: &str) -> Option<&str> {
    key.strip_prefix(CONSUMERS_PREFIX)
        .filter(|n| valid_consumer_name(n))
}

/// Consumer names: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn valid_consumer_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Key of mark `name`. Mark names follow the consumer-name rule ([`valid_consumer_name`]).
pub fn mark_key(name: &str) -> String {
    format!("{MARKS_PREFIX}{name}")
}

/// Parses a mark key back to the name.
pub fn parse_mark_key(key: &str) -> Option<&str> {
    key.strip_prefix(MARKS_PREFIX)
        .filter(|n| valid_consumer_name(n))
}

/// Key of undo segment `seq`.
pub fn undo_segment_key(seq: u64) -> String {
    format!("{UNDO_PREFIX}{seq:020}")
}

/// Parses an undo segment key back to its seq.
pub fn parse_undo_segment_key(key: &str) -> Option<u64> {
    parse_padded(key.strip_prefix(UNDO_PREFIX)?)
}

fn parse_padded(s: &str) -> Option<u64> {
    (s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Keys under an object replica's root (see docs/DESIGN.md, "Object replica").
pub mod objrep {
    use super::parse_padded;

    /// The replica's identity, written once by conditional create.
    pub const IDENTITY: &str = "objrep.json";
    /// Folder of delta layers.
    pub const LAYERS_PREFIX: &str = "layers/";
    /// Folder of manifest generations.
    pub const CHECKPOINTS_PREFIX: &str = "checkpoints/";
    /// Folder of image layers' parts.
    pub const IMAGES_PREFIX: &str = "images/";

    /// Key of the delta layer holding the net effect of LSNs `first..=last`, uploaded for
    /// manifest generation `gen` by agent run `run` (so a retry by another run never meets a
    /// key holding other bytes).
    pub fn layer_key(gen: u64, first: u64, last: u64, run: u64) -> String {
        format!("{LAYERS_PREFIX}{gen:020}-{first:020}-{last:020}-{run:016x}")
    }

    /// Parses a layer key back to `(gen, first, last, run)`.
    pub fn parse_layer_key(key: &str) -> Option<(u64, u64, u64, u64)> {
        let rest = key.strip_prefix(LAYERS_PREFIX)?;
        let mut parts = rest.split('-');
        let gen = parse_padded(parts.next()?)?;
        let first = parse_padded(parts.next()?)?;
        let last = parse_padded(parts.next()?)?;
        let run = parts.next()?;
        if run.len() != 16 || parts.next().is_some() {
            return None;
        }
        Some((gen, first, last, u64::from_str_radix(run, 16).ok()?))
    }

    /// Key of part `part` of the image at checkpoint `lsn` written by compaction run `run`
    /// (its start time in seconds in the high 32 bits: see `objrep::compact::run_id`).
    pub fn image_key(lsn: u64, run: u64, part: u32) -> String {
        format!("{IMAGES_PREFIX}{lsn:020}-{run:016x}-{part:06}")
    }

    /// Parses an image part's key back to `(lsn, run, part)`.
    pub fn parse_image_key(key: &str) -> Option<(u64, u64, u32)> {
        let rest = key.strip_prefix(IMAGES_PREFIX)?;
        let mut parts = rest.split('-');
        let lsn = parse_padded(parts.next()?)?;
        let run = parts.next()?;
        let part = parts.next()?;
        if run.len() != 16 || part.len() != 6 || parts.next().is_some() {
            return None;
        }
        Some((lsn, u64::from_str_radix(run, 16).ok()?, part.parse().ok()?))
    }

    /// Key of manifest generation `gen`.
    pub fn checkpoint_key(gen: u64) -> String {
        format!("{CHECKPOINTS_PREFIX}{gen:020}")
    }

    /// Parses a manifest key back to its generation.
    pub fn parse_checkpoint_key(key: &str) -> Option<u64> {
        parse_padded(key.strip_prefix(CHECKPOINTS_PREFIX)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_keys_round_trip_and_sort_by_seq_inside_a_stripe() {
        assert_eq!(segment_key(7, 4), "journal/3/00000000000000000007");
        assert_eq!(parse_segment_key(&segment_key(7, 4), 4), Some(7));
        assert_eq!(parse_segment_key("journal/2/00000000000000000007", 4), None);
        assert!(segment_key(3, 1) < segment_key(11, 1));
    }

    #[test]
    fn epoch_keys_sort_numerically() {
        assert!(epoch_key(9) < epoch_key(10));
        assert_eq!(parse_epoch_key(&epoch_key(42)), Some(42));
        assert_eq!(parse_epoch_key("epochs/42"), None);
    }

    #[test]
    fn undo_keys_round_trip_and_sort_by_seq() {
        assert_eq!(undo_segment_key(12), "undo/00000000000000000012");
        assert_eq!(parse_undo_segment_key(&undo_segment_key(12)), Some(12));
        assert_eq!(parse_undo_segment_key("undo/12"), None);
        assert!(undo_segment_key(9) < undo_segment_key(10));
    }

    #[test]
    fn consumer_names_are_restricted() {
        assert!(valid_consumer_name("dr-site.1"));
        assert!(!valid_consumer_name(""));
        assert!(!valid_consumer_name("../x"));
        assert!(!valid_consumer_name(".hidden"));
        assert_eq!(parse_consumer_key("consumers/a"), Some("a"));
    }

    #[test]
    fn object_replica_keys_round_trip_and_sort_by_generation() {
        let k = objrep::layer_key(3, 10, 99, 0xabc);
        assert_eq!(
            k,
            "layers/00000000000000000003-00000000000000000010-00000000000000000099-0000000000000abc"
        );
        assert_eq!(objrep::parse_layer_key(&k), Some((3, 10, 99, 0xabc)));
        assert_eq!(objrep::parse_layer_key("layers/3-10-99-abc"), None);
        assert_eq!(
            objrep::parse_checkpoint_key(&objrep::checkpoint_key(12)),
            Some(12)
        );
        assert!(objrep::checkpoint_key(9) < objrep::checkpoint_key(10));
        let k = objrep::image_key(42, 0x1234_5678_9abc_def0, 7);
        assert_eq!(k, "images/00000000000000000042-123456789abcdef0-000007");
        assert_eq!(
            objrep::parse_image_key(&k),
            Some((42, 0x1234_5678_9abc_def0, 7))
        );
        assert_eq!(objrep::parse_image_key("images/42-1-7"), None);
    }
}
