//! Marks: named points in a journal (`marks/<name>`), written once when a `MARK` record is
//! durable, so a name still resolves to its LSN and time after the segment holding the
//! record has been trimmed.
//!
//! Must never: overwrite a mark (names are unique per journal; a second mark of the same
//! name is refused), or be deleted by trim while its point is inside a retained window.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::consumer::decode;
use super::error::{JournalError, JournalResult};
use super::paths;
use crate::store::{list_all, ObjectStore};

/// One named point (JSON at `marks/<name>`).
///
/// # Invariants
/// - `lsn` is the LSN of the `MARK` record itself; the point it names is the state after
///   every record up to and including `lsn` (the record changes no data).
/// - `timestamp_ns` is that record's timestamp (ns since the UNIX epoch, UTC).
/// - Written once by conditional create, after the record is durable in the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkPoint {
    pub name: String,
    pub lsn: u64,
    pub timestamp_ns: u64,
}

fn check_name(name: &str) -> JournalResult<()> {
    if paths::valid_consumer_name(name) {
        Ok(())
    } else {
        Err(JournalError::InvalidMarkName(name.to_string()))
    }
}

/// Checks a mark name before anything is written (the CLI and the control socket use it).
pub fn validate_name(name: &str) -> JournalResult<()> {
    check_name(name)
}

/// Records `mark` by conditional create; a mark of the same name is refused with
/// [`JournalError::MarkExists`].
pub async fn create(store: &dyn ObjectStore, mark: &MarkPoint) -> JournalResult<()> {
    check_name(&mark.name)?;
    let key = paths::mark_key(&mark.name);
    let body = serde_json::to_vec_pretty(mark).expect("mark serializes");
    match store.put_if_absent(&key, Bytes::from(body)).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_already_exists() => {
            let existing = load(store, &mark.name).await?;
            Err(JournalError::MarkExists {
                journal: store.describe(),
                name: mark.name.clone(),
                lsn: existing.lsn,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads one mark.
pub async fn load(store: &dyn ObjectStore, name: &str) -> JournalResult<MarkPoint> {
    check_name(name)?;
    let key = paths::mark_key(name);
    match store.get(&key).await {
        Ok(data) => decode(store, &key, "mark", &data),
        Err(e) if e.is_not_found() => Err(JournalError::UnknownMark {
            journal: store.describe(),
            name: name.to_string(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Every mark, oldest LSN first.
pub async fn list(store: &dyn ObjectStore) -> JournalResult<Vec<MarkPoint>> {
    let mut out = Vec::new();
    for meta in list_all(store, paths::MARKS_PREFIX).await? {
        let Some(name) = paths::parse_mark_key(&meta.key) else {
            continue;
        };
        match load(store, name).await {
            Ok(mark) => out.push(mark),
            Err(JournalError::UnknownMark { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by_key(|m| m.lsn);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn mark(name: &str, lsn: u64) -> MarkPoint {
        MarkPoint {
            name: name.into(),
            lsn,
            timestamp_ns: lsn * 1000,
        }
    }

    #[tokio::test]
    async fn a_mark_is_written_once_and_listed_in_lsn_order() {
        let store = MemoryStore::new();
        create(&store, &mark("after-b", 20)).await.unwrap();
        create(&store, &mark("after-a", 10)).await.unwrap();
        let err = create(&store, &mark("after-a", 30)).await.unwrap_err();
        assert!(
            matches!(err, JournalError::MarkExists { lsn: 10, .. }),
            "{err}"
        );
        assert_eq!(load(&store, "after-a").await.unwrap().lsn, 10);
        let names: Vec<_> = list(&store)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["after-a", "after-b"]);
    }

    #[tokio::test]
    async fn unknown_and_invalid_names_are_refused() {
        let store = MemoryStore::new();
        assert!(matches!(
            load(&store, "nope").await,
            Err(JournalError::UnknownMark { .. })
        ));
        assert!(matches!(
            create(&store, &mark("../x", 1)).await,
            Err(JournalError::InvalidMarkName(_))
        ));
    }
}
