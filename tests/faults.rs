//! Faults the emulator cannot produce, from a stand-in shard reader:
//! throttling (ProvisionedThroughputExceeded) and expired iterators. The
//! real consumer, converter pool, chain and store run; only the reader is
//! replaced. Every record must be stored exactly once.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use shardflow::kinesis::reader::{Fetched, Position, RawRecord, ReadError, ShardInfo, ShardReader};

const RECORDS: usize = 300;

/// One shard of `RECORDS` records, served 25 at a time, that throttles
/// every third call and lets the iterator expire on the fifth.
#[derive(Default)]
struct FaultyReader {
    calls: AtomicUsize,
    positions: Mutex<Vec<String>>,
}

impl ShardReader for FaultyReader {
    fn shards(&self, _: &str) -> BoxFuture<'static, Result<Vec<ShardInfo>, ReadError>> {
        Box::pin(async {
            Ok(vec![ShardInfo {
                id: "shardId-000000000000".into(),
                parents: vec![],
                hash_range: None,
            }])
        })
    }

    fn created_ms(&self, _: &str) -> BoxFuture<'static, Result<Option<i64>, ReadError>> {
        Box::pin(async { Ok(None) })
    }

    fn iterator(
        &self,
        _: &str,
        _: &str,
        position: &Position,
    ) -> BoxFuture<'static, Result<Option<String>, ReadError>> {
        self.positions.lock().unwrap().push(format!("{position:?}"));
        let offset = match position {
            // Sequence numbers are offset + 1.
            Position::After(sequence) => sequence.parse::<usize>().unwrap(),
            Position::At(sequence) => sequence.parse::<usize>().unwrap() - 1,
            Position::Initial(_) => 0,
        };
        Box::pin(async move { Ok(Some(offset.to_string())) })
    }

    fn records(
        &self,
        iterator: String,
        limit: i32,
    ) -> BoxFuture<'static, Result<Fetched, ReadError>> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let result = if call == 5 {
            Err((
                "ExpiredIteratorException".to_string(),
                "Iterator expired".to_string(),
            ))
        } else if call.is_multiple_of(3) {
            Err((
                "ProvisionedThroughputExceededException".to_string(),
                "Rate exceeded".to_string(),
            ))
        } else {
            let offset: usize = iterator.parse().unwrap();
            let count = (limit as usize).min(25).min(RECORDS - offset);
            let records = (offset..offset + count)
                .map(|n| RawRecord {
                    sequence_number: (n + 1).to_string(),
                    partition_key: "k".into(),
                    arrival_ms: 1_700_000_000_000,
                    data: Bytes::from(format!(r#"{{"seq": {n}}}"#)),
                })
                .collect();
            let next = offset + count;
            Ok(Fetched {
                records,
                next_iterator: Some(next.to_string()),
                millis_behind_latest: Some(if next < RECORDS { 1000 } else { 0 }),
            })
        };
        Box::pin(async move { result })
    }

    fn call_interval(&self) -> Duration {
        Duration::from_millis(1)
    }
}

const CONVERTER: &str = r#"
var data = decodeToJson(payload);
return { deviceName: "d", telemetry: { ts: 1700000000000 + data.seq, values: { seq: data.seq } } };
"#;

#[test]
fn throttling_and_expired_iterators_lose_and_repeat_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::standin::workspace(
        dir.path(),
        "faulty",
        CONVERTER,
        "",
        "initial_position = \"TRIM_HORIZON\"",
    );
    let reader = Arc::new(FaultyReader::default());
    let used = reader.clone();
    let counted = common::standin::run_until(
        &config,
        move |_, _| reader.clone() as Arc<dyn ShardReader>,
        |_, done| done >= RECORDS as u64,
    );

    let device = counted
        .entity_by_name(shardflow::msg::EntityType::Device, "d")
        .unwrap();
    assert_eq!(counted.history_count(device.id).unwrap(), RECORDS as i64);
    let positions = used.positions.lock().unwrap().clone();
    assert_eq!(positions.len(), 2, "{positions:?}");
    assert!(
        positions[1].starts_with("After("),
        "re-positioned after the last record: {positions:?}"
    );
    let checkpoint = counted
        .checkpoint(
            "shardflow-kinesis_integration",
            "faulty",
            "shardId-000000000000",
        )
        .unwrap();
    assert_eq!(checkpoint.unwrap().sequence_number.as_deref(), Some("300"));
}

/// A shard whose parents have expired from the stream (no longer listed):
/// 40 records, then its end.
struct OrphanReader;

const ORPHAN_RECORDS: usize = 40;

impl ShardReader for OrphanReader {
    fn shards(&self, _: &str) -> BoxFuture<'static, Result<Vec<ShardInfo>, ReadError>> {
        Box::pin(async {
            Ok(vec![ShardInfo {
                id: "shardId-000000000002".into(),
                parents: vec!["shardId-000000000000".into(), "shardId-000000000001".into()],
                hash_range: None,
            }])
        })
    }

    fn created_ms(&self, _: &str) -> BoxFuture<'static, Result<Option<i64>, ReadError>> {
        Box::pin(async { Ok(None) })
    }

    fn iterator(
        &self,
        _: &str,
        _: &str,
        position: &Position,
    ) -> BoxFuture<'static, Result<Option<String>, ReadError>> {
        let offset = match position {
            Position::After(sequence) => sequence.parse::<usize>().unwrap(),
            Position::At(sequence) => sequence.parse::<usize>().unwrap() - 1,
            Position::Initial(_) => 0,
        };
        Box::pin(async move { Ok(Some(offset.to_string())) })
    }

    fn records(
        &self,
        iterator: String,
        limit: i32,
    ) -> BoxFuture<'static, Result<Fetched, ReadError>> {
        let offset: usize = iterator.parse().unwrap();
        let count = (limit as usize).min(10).min(ORPHAN_RECORDS - offset);
        let records = (offset..offset + count)
            .map(|n| RawRecord {
                sequence_number: (n + 1).to_string(),
                partition_key: "k".into(),
                arrival_ms: 1_700_000_000_000,
                data: Bytes::from(format!(r#"{{"seq": {n}}}"#)),
            })
            .collect();
        let next = offset + count;
        Box::pin(async move {
            Ok(Fetched {
                records,
                next_iterator: (next < ORPHAN_RECORDS).then(|| next.to_string()),
                millis_behind_latest: Some(0),
            })
        })
    }

    fn call_interval(&self) -> Duration {
        Duration::from_millis(1)
    }
}

#[test]
fn a_shard_whose_parents_expired_is_read_and_finished() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::standin::workspace(
        dir.path(),
        "orphaned",
        CONVERTER,
        "",
        "initial_position = \"TRIM_HORIZON\"",
    );
    let shard_end = |store: &shardflow::store::Store| {
        store
            .checkpoint(
                "shardflow-kinesis_integration",
                "orphaned",
                "shardId-000000000002",
            )
            .unwrap()
            .is_some_and(|c| c.shard_end)
    };
    let store = common::standin::run_until(
        &config,
        |_, _| Arc::new(OrphanReader) as Arc<dyn ShardReader>,
        |store, _| shard_end(store),
    );
    let device = store
        .entity_by_name(shardflow::msg::EntityType::Device, "d")
        .unwrap();
    assert_eq!(
        store.history_count(device.id).unwrap(),
        ORPHAN_RECORDS as i64
    );
}
