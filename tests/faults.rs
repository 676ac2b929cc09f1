//! Faults the emulator cannot produce, from a stand-in shard reader:
//! throttling (ProvisionedThroughputExceeded) and expired iterators. The
//! real consumer, converter pool, chain and store run; only the reader is
//! replaced. Every record must be stored exactly once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use shardflow::config::Config;
use shardflow::kinesis::reader::{Fetched, Position, RawRecord, ReadError, ShardInfo, ShardReader};
use shardflow::service::Pipeline;
use shardflow::store::Store;

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
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.path().join("converters")).unwrap();
    std::fs::write(dir.path().join("converters/up.js"), CONVERTER).unwrap();
    std::fs::copy(
        root.join("converters/kinesis_downlink_version.js"),
        dir.path().join("converters/down.js"),
    )
    .unwrap();
    std::fs::copy(
        root.join("rulechains/root.json"),
        dir.path().join("root.json"),
    )
    .unwrap();
    let config_text = r#"
        root_chain = "root.json"
        [[integration]]
        name = "kinesis_integration"
        uplink_converter = "converters/up.js"
        downlink_converter = "converters/down.js"
        stream_name = "faulty"
        access_key_id = "test"
        secret_access_key = "test"
        initial_position = "TRIM_HORIZON"
        endpoint_url = "http://127.0.0.1:9"
    "#;
    std::fs::write(dir.path().join("shardflow.toml"), config_text).unwrap();
    let config = Config::load(&dir.path().join("shardflow.toml")).unwrap();
    let source = shardflow::service::preflight(&config).unwrap();
    let store = Store::open(&config.data_dir).unwrap();

    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let reader = Arc::new(FaultyReader::default());
    let used = reader.clone();
    let counted = store.clone();
    let handle = io.handle().clone();
    actix::System::new().block_on(async move {
        let factory = move |_: &shardflow::config::IntegrationConfig,
                            _: &aws_sdk_kinesis::Client| {
            reader.clone() as Arc<dyn ShardReader>
        };
        let pipeline = Pipeline::start(&config, source, store, handle, &factory)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while pipeline.status.records_done.load(Ordering::Relaxed) < RECORDS as u64 {
            assert!(
                Instant::now() < deadline,
                "records done: {:?}",
                pipeline.status.records_done
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pipeline.stop().await.unwrap();
    });

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
