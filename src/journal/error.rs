//! Errors of the journal metadata layer (manifest, epochs, consumers, trim pointer, head).

use crate::store::StoreError;

/// One variant per way journal metadata fails; each names the journal and object.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// `init` found a manifest already there: a journal is never overwritten.
    #[error("a journal already exists at {journal} (found {key}); refusing to overwrite it")]
    AlreadyInitialized { journal: String, key: String },
    /// No manifest: the journal was never initialized (or the URI points elsewhere).
    #[error("no tinylag journal at {journal}: {key} not found (run `tinylag init` first?)")]
    NotInitialized { journal: String, key: String },
    /// A metadata object is not valid JSON of the expected shape.
    #[error("object {key} in {journal} is not a valid {what}: {reason}")]
    Malformed {
        journal: String,
        key: String,
        what: &'static str,
        reason: String,
    },
    /// The manifest was written by a newer tinylag.
    #[error(
        "journal {journal} has format version {found}; this tinylag reads version {supported}"
    )]
    UnsupportedVersion {
        journal: String,
        found: u32,
        supported: u32,
    },
    /// A manifest or configuration value is out of range.
    #[error("invalid journal parameter {name}: {reason}")]
    InvalidParameter { name: &'static str, reason: String },
    /// Another writer claimed the same epoch at the same moment.
    #[error("writer epoch {epoch} of {journal} was claimed concurrently by another writer")]
    EpochContended { journal: String, epoch: u64 },
    /// A newer writer epoch exists: this writer has been fenced.
    #[error("writer epoch {epoch} of {journal} is fenced by epoch {newer}")]
    Fenced {
        journal: String,
        epoch: u64,
        newer: u64,
    },
    /// Another writer holds a live lease on the journal (see `journal::lease`).
    #[error(
        "journal {journal} is owned by a live writer: epoch {epoch} on host {host}, pid {pid}, \
         since {since} (lease renewed {renewed_secs_ago:.1}s ago, expires in \
         {expires_in_secs:.1}s); stop that `tinylag serve`, or pass --takeover to fence it on \
         purpose"
    )]
    LeaseHeld {
        journal: String,
        epoch: u64,
        host: String,
        pid: u32,
        since: String,
        renewed_secs_ago: f64,
        expires_in_secs: f64,
    },
    /// A consumer name outside `[A-Za-z0-9._-]{1,64}`.
    #[error("invalid consumer name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with .)")]
    InvalidConsumerName(String),
    /// The consumer is not registered.
    #[error("consumer {name} is not registered in {journal}")]
    UnknownConsumer { journal: String, name: String },
    /// A mark name outside `[A-Za-z0-9._-]{1,64}`.
    #[error("invalid mark name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with .)")]
    InvalidMarkName(String),
    /// A mark of that name exists already: names are unique per journal.
    #[error("mark {name} already exists in {journal} (at LSN {lsn}); mark names are unique")]
    MarkExists {
        journal: String,
        name: String,
        lsn: u64,
    },
    /// No mark of that name.
    #[error("no mark named {name} in {journal}")]
    UnknownMark { journal: String, name: String },
    /// A segment is missing below the journal's known end (see `journal::head`): a hole,
    /// not the end. Nothing past it can be read; it is never taken for the end.
    #[error(
        "journal hole at seq {first_missing}: {key} is missing in {journal}, but {known_from} \
         records segments up to seq {known_end} (exclusive){next}; the journal cannot be read \
         past it. Restore the missing object, or restart `tinylag serve --abandon-after-hole` \
         to abandon everything after it and resync every replica in full",
        next = missing_range(*.first_missing, *.next_present)
    )]
    Hole {
        journal: String,
        key: String,
        first_missing: u64,
        /// The next seq found present after the hole, when one was looked for.
        next_present: Option<u64>,
        /// One past the highest seq known to have been durable.
        known_end: u64,
        /// Who recorded `known_end` (a writer's lease, a consumer's commit position, …).
        known_from: String,
    },
    /// An encrypted journal and no key: refused before any object is read.
    #[error(
        "journal {journal} is encrypted (key {key_id}); pass --encryption-key FILE with a \
         keyring that holds it"
    )]
    KeyNeeded { journal: String, key_id: String },
    /// A writer with a key on a plaintext journal: encryption is chosen at `init`.
    #[error(
        "journal {journal} is not encrypted, but --encryption-key was given: a journal is \
         encrypted for its whole life, chosen at `tinylag init --encryption-key FILE`; drop \
         the flag, or init a new journal with it"
    )]
    PlaintextJournalGivenKey { journal: String },
    /// A segment could not be read or decoded.
    #[error(transparent)]
    Segment(#[from] crate::journal::segment::SegmentError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type JournalResult<T> = Result<T, JournalError>;

/// ", seqs A..B are missing" when a hole spans more than one seq.
fn missing_range(first_missing: u64, next_present: Option<u64>) -> String {
    match next_present {
        Some(next) if next > first_missing + 1 => {
            format!("; seqs {first_missing}..{next} are missing")
        }
        _ => String::new(),
    }
}
