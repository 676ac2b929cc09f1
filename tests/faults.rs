//! Faults the emulator cannot produce, from a stand-in shard reader:
//! throttling (ProvisionedThroughputExceeded) and expired iterators. The
//! real consumer, converter pool, chain and store run; only the reader is
//! replaced. Every record must be stored exactly once. Also a shard whose
//! parents have expired from the stream.

mod common;

use std::sync::Arc;

use common::standin::PayloadReader;
use shardflow::kinesis::reader::{ReadError, ShardInfo, ShardReader};

const RECORDS: usize = 300;

fn seq_payloads(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|n| format!(r#"{{"seq": {n}}}"#).into_bytes())
        .collect()
}

/// Throttles every third call and lets the iterator expire on the fifth.
fn throttle_and_expire(call: usize) -> Option<ReadError> {
    if call == 5 {
        Some((
            "ExpiredIteratorException".to_string(),
            "Iterator expired".to_string(),
        ))
    } else if call.is_multiple_of(3) {
        Some((
            "ProvisionedThroughputExceededException".to_string(),
            "Rate exceeded".to_string(),
        ))
    } else {
        None
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
    let reader = Arc::new(PayloadReader {
        per_call: 25,
        fault: throttle_and_expire,
        ..PayloadReader::new(seq_payloads(RECORDS))
    });
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

const ORPHAN_RECORDS: usize = 40;

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
    // Its parents are not listed: they have expired from the stream.
    let orphan = Arc::new(PayloadReader {
        shard: ShardInfo {
            id: "shardId-000000000002".into(),
            parents: vec!["shardId-000000000000".into(), "shardId-000000000001".into()],
            hash_range: None,
        },
        ends: true,
        ..PayloadReader::new(seq_payloads(ORPHAN_RECORDS))
    });
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
        move |_, _| orphan.clone() as Arc<dyn ShardReader>,
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
