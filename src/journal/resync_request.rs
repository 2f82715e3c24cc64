//! Resync requests: the channel from a rejoining old primary to the current writer, through
//! the store (`requests/resync/<name>`). `rejoin` writes one naming the regions its image
//! diverged in since the fork; the writer lists the folder at every lease renewal (one
//! LIST), journals each request's regions as a resync span, and deletes the request once
//! that span's `RESYNC_END` is durable.
//!
//! A request is idempotent: a writer that crashes before deleting it (or a newer writer)
//! journals the same regions again, which costs bytes but never correctness (a resync span
//! carries the primary's current bytes).
//!
//! Must never: be read as an instruction to change the primary (a request only asks the
//! writer to *read* regions into the journal); build a key outside `journal::paths`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::consumer::decode;
use super::epoch::Predecessor;
use super::error::{JournalError, JournalResult};
use super::paths;
use super::seed::RegionRanges;
use crate::store::{list_all, ObjectStore};

/// A rejoining replica's request (JSON at `requests/resync/<name>`, `name` = its consumer):
///
/// ```json
/// {"name":"sitea","regions":"0,3,8-11","fork":{"epoch":3,"lsn":8500},
///  "requested_at_ns":1765000000000000000}
/// ```
///
/// `regions` is the text form `tinylag resync --regions` takes (region = the journal's
/// dirty-tracking region); `fork` is where the rejoining image left the chain (for the
/// writer's log and for operators: the writer journals the regions whatever it says).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncRequest {
    pub name: String,
    pub regions: String,
    pub fork: Predecessor,
    pub requested_at_ns: u64,
}

impl ResyncRequest {
    /// A request for `regions`.
    pub fn new(name: &str, regions: &RegionRanges, fork: Predecessor, now_ns: u64) -> Self {
        ResyncRequest {
            name: name.to_string(),
            regions: regions.to_string(),
            fork,
            requested_at_ns: now_ns,
        }
    }

    /// The regions, checked against the device's `count` regions.
    pub fn region_set(&self, count: u64) -> Result<RegionRanges, String> {
        let set: RegionRanges = self.regions.parse()?;
        if set.end() > count {
            return Err(format!(
                "region {} does not exist: the device has regions 0..{count}",
                set.end() - 1
            ));
        }
        Ok(set)
    }
}

/// Writes (or replaces: a rejoin run again asks anew) the request of `request.name`, then
/// rings the doorbell ([`paths::RESYNC_DOORBELL`]) — in that order, so a writer that hears it
/// and lists finds the request.
pub async fn create(store: &dyn ObjectStore, request: &ResyncRequest) -> JournalResult<()> {
    if !paths::valid_consumer_name(&request.name) {
        return Err(JournalError::InvalidConsumerName(request.name.clone()));
    }
    let body = serde_json::to_vec(request).expect("a resync request always serializes");
    store
        .put(&paths::resync_request_key(&request.name), Bytes::from(body))
        .await?;
    store
        .put(paths::RESYNC_DOORBELL, Bytes::from_static(b"{}"))
        .await
        .map_err(Into::into)
}

/// Whether the doorbell rings (one HEAD): a request may be waiting that the writer has not
/// listed yet.
pub async fn doorbell_rings(store: &dyn ObjectStore) -> JournalResult<bool> {
    match store.head(paths::RESYNC_DOORBELL).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Silences the doorbell. The writer does it *before* it lists, so a request created after
/// the list rings it again and is listed at the next renewal.
pub async fn silence_doorbell(store: &dyn ObjectStore) -> JournalResult<()> {
    store
        .delete_many(&[paths::RESYNC_DOORBELL.to_string()])
        .await
        .map_err(Into::into)
}

/// The names of the pending requests: one LIST (the folder holds one key per rejoining
/// replica, and is empty in the steady state).
pub async fn list_names(store: &dyn ObjectStore) -> JournalResult<Vec<String>> {
    Ok(list_all(store, paths::RESYNC_REQUESTS_PREFIX)
        .await?
        .iter()
        .filter_map(|o| paths::parse_resync_request_key(&o.key).map(str::to_string))
        .collect())
}

/// Reads the request of `name`; `None` when it is gone (done meanwhile).
pub async fn read(store: &dyn ObjectStore, name: &str) -> JournalResult<Option<ResyncRequest>> {
    let key = paths::resync_request_key(name);
    let data = match store.get(&key).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let request: ResyncRequest = decode(store, &key, "resync request", &data)?;
    if request.name != name {
        return Err(JournalError::Malformed {
            journal: store.describe(),
            key,
            what: "resync request",
            reason: format!("it names consumer {}", request.name),
        });
    }
    Ok(Some(request))
}

/// Deletes the request of `name` (done, or withdrawn).
pub async fn delete(store: &dyn ObjectStore, name: &str) -> JournalResult<()> {
    store
        .delete_many(&[paths::resync_request_key(name)])
        .await
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn a_request_is_written_listed_read_replaced_and_deleted() {
        let store = MemoryStore::new();
        assert!(list_names(&store).await.unwrap().is_empty());
        let regions: RegionRanges = "0,3,8-11".parse().unwrap();
        let fork = Predecessor { epoch: 3, lsn: 85 };
        let req = ResyncRequest::new("sitea", &regions, fork, 7);
        create(&store, &req).await.unwrap();
        assert_eq!(list_names(&store).await.unwrap(), vec!["sitea".to_string()]);
        let read_back = read(&store, "sitea").await.unwrap().unwrap();
        assert_eq!(read_back, req);
        assert_eq!(read_back.regions, "0,3,8-11");
        assert_eq!(read_back.region_set(12).unwrap(), regions);
        assert!(read_back.region_set(11).unwrap_err().contains("region 11"));
        let again = ResyncRequest::new("sitea", &"5".parse().unwrap(), fork, 8);
        create(&store, &again).await.unwrap();
        assert_eq!(read(&store, "sitea").await.unwrap(), Some(again));
        delete(&store, "sitea").await.unwrap();
        assert!(list_names(&store).await.unwrap().is_empty());
        assert_eq!(read(&store, "sitea").await.unwrap(), None);
        let bad = ResyncRequest::new("../x", &regions, fork, 1);
        assert!(create(&store, &bad).await.is_err());
    }
}
