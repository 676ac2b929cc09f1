//! A checkpoint older than the stream's retention period: the records after
//! it may have been trimmed before they were read. The emulator keeps
//! records for at least a day, so a stand-in shard reader plays a stream
//! with a 24-hour retention whose checkpoints are three days old. The real
//! consumer, converter pool, chain and store run; the ERROR with the size of
//! the gap is read from the service's own log output.

use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use shardflow::config::Config;
use shardflow::kinesis::reader::{Fetched, Position, RawRecord, ReadError, ShardInfo, ShardReader};
use shardflow::service::Pipeline;
use shardflow::store::{Store, Write};

const HOUR_MS: i64 = 3_600_000;
/// Shards: one whose next records were trimmed (the first read is not the
/// record after the checkpoint), one whose checkpoint GetShardIterator
/// refuses, one with a recent checkpoint.
const TRIMMED: &str = "shardId-000000000000";
const REFUSED: &str = "shardId-000000000001";
const RECENT: &str = "shardId-000000000002";
/// Records 1..=10 on each shard; 1..=5 have expired on the first two.
const RECORDS: usize = 10;

struct RetentionReader {
    now_ms: i64,
}

impl RetentionReader {
    fn first_kept(shard: &str) -> usize {
        if shard == RECENT {
            1
        } else {
            6
        }
    }
}

impl ShardReader for RetentionReader {
    fn shards(&self, _: &str) -> BoxFuture<'static, Result<Vec<ShardInfo>, ReadError>> {
        let shards = [TRIMMED, REFUSED, RECENT]
            .iter()
            .map(|id| ShardInfo {
                id: id.to_string(),
                parents: vec![],
                hash_range: None,
            })
            .collect();
        Box::pin(async move { Ok(shards) })
    }

    fn created_ms(&self, _: &str) -> BoxFuture<'static, Result<Option<i64>, ReadError>> {
        Box::pin(async { Ok(None) })
    }

    fn retention_hours(&self, _: &str) -> BoxFuture<'static, Result<Option<i64>, ReadError>> {
        Box::pin(async { Ok(Some(24)) })
    }

    fn iterator(
        &self,
        _: &str,
        shard: &str,
        position: &Position,
    ) -> BoxFuture<'static, Result<Option<String>, ReadError>> {
        let first_kept = Self::first_kept(shard);
        let result = match position {
            Position::After(_) if shard == REFUSED => Err((
                "InvalidArgumentException".to_string(),
                "the sequence number is beyond the trim horizon".to_string(),
            )),
            // Trimmed records are skipped over, as Kinesis does.
            Position::After(sequence) => {
                let after: usize = sequence.parse().unwrap();
                Ok(Some(format!("{shard}:{}", after.max(first_kept - 1))))
            }
            Position::At(_) => panic!("no aggregates here"),
            Position::Initial(_) => Ok(Some(format!("{shard}:{}", first_kept - 1))),
        };
        Box::pin(async move { result })
    }

    fn records(
        &self,
        iterator: String,
        limit: i32,
    ) -> BoxFuture<'static, Result<Fetched, ReadError>> {
        let (shard, offset) = iterator.split_once(':').unwrap();
        let offset: usize = offset.parse().unwrap();
        let count = (limit as usize).min(RECORDS - offset);
        let shard_number: i64 = shard.trim_start_matches("shardId-").parse().unwrap();
        // The kept records arrived an hour ago.
        let arrival_ms = self.now_ms - HOUR_MS;
        let records = (offset..offset + count)
            .map(|n| RawRecord {
                sequence_number: (n + 1).to_string(),
                partition_key: "k".into(),
                arrival_ms,
                data: Bytes::from(format!(r#"{{"shard": {shard_number}, "seq": {}}}"#, n + 1)),
            })
            .collect();
        let next = format!("{shard}:{}", offset + count);
        Box::pin(async move {
            Ok(Fetched {
                records,
                next_iterator: Some(next),
                millis_behind_latest: Some(0),
            })
        })
    }

    fn call_interval(&self) -> Duration {
        Duration::from_millis(5)
    }
}

const CONVERTER: &str = r#"
var data = decodeToJson(payload);
return { deviceName: "shard-" + data.shard,
         telemetry: { ts: 1700000000000 + data.seq, values: { seq: data.seq } } };
"#;

/// Collects the service's log lines.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().write(bytes)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The value of `field=` in a log line.
fn field(line: &str, name: &str) -> i64 {
    let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
    line[start..]
        .split(|c: char| !c.is_ascii_digit() && c != '-')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_checkpoint_older_than_the_retention_is_logged_at_error_with_the_gap() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.path().join("converters")).unwrap();
    std::fs::write(dir.path().join("converters/up.js"), CONVERTER).unwrap();
    std::fs::copy(
        root.join("rulechains/root.json"),
        dir.path().join("root.json"),
    )
    .unwrap();
    std::fs::copy(
        root.join("converters/kinesis_downlink_version.js"),
        dir.path().join("converters/down.js"),
    )
    .unwrap();
    let config_text = r#"
        root_chain = "root.json"
        [[integration]]
        name = "kinesis_integration"
        uplink_converter = "converters/up.js"
        downlink_converter = "converters/down.js"
        stream_name = "retained"
        access_key_id = "test"
        secret_access_key = "test"
        endpoint_url = "http://127.0.0.1:9"
    "#;
    std::fs::write(dir.path().join("shardflow.toml"), config_text).unwrap();
    let config = Config::load(&dir.path().join("shardflow.toml")).unwrap();
    let source = shardflow::service::preflight(&config).unwrap();
    let store = Store::open(&config.data_dir).unwrap();

    // Checkpoints on record 2 of each shard: three days old on the first
    // two, ten minutes on the third.
    let now_ms = shardflow::msg::now_millis();
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for (shard, age_ms) in [
        (TRIMMED, 72 * HOUR_MS),
        (REFUSED, 72 * HOUR_MS),
        (RECENT, 600_000),
    ] {
        let write = Write::Checkpoint {
            application: config.integrations[0].application_name.clone(),
            stream: "retained".into(),
            shard: shard.into(),
            sequence_number: Some("2".into()),
            sub_sequence_number: None,
            arrival_ms: Some(now_ms - age_ms),
            shard_end: false,
        };
        io.block_on(store.write(vec![write], None)).unwrap();
    }

    let reader = Arc::new(RetentionReader { now_ms });
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
        // 5 records on each of the first two shards, 8 on the third.
        let deadline = Instant::now() + Duration::from_secs(60);
        while pipeline.status.records_done.load(Ordering::Relaxed) < 18 {
            assert!(
                Instant::now() < deadline,
                "records done: {:?}",
                pipeline.status.records_done
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pipeline.stop().await.unwrap();
    });

    let text = log.text();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("older than the stream's retention period"))
        .collect();
    assert_eq!(errors.len(), 2, "one ERROR per old checkpoint:\n{text}");

    // The trimmed shard: the gap runs from the checkpoint's record (three
    // days ago) to the first record read (an hour ago).
    let trimmed = errors
        .iter()
        .find(|l| l.contains(TRIMMED))
        .expect("trimmed shard");
    assert_eq!(field(trimmed, "gap_ms"), 71 * HOUR_MS, "{trimmed}");
    assert!(
        trimmed.contains("first_read_sequence_number=6")
            || trimmed.contains("first_read_sequence_number=\"6\""),
        "{trimmed}"
    );
    // The refused shard: to the trim horizon (24 hours ago), give or take
    // the time the test took; then it is read from TRIM_HORIZON.
    let refused = errors
        .iter()
        .find(|l| l.contains(REFUSED))
        .expect("refused shard");
    let gap = field(refused, "gap_ms");
    assert!(
        (48 * HOUR_MS..48 * HOUR_MS + 600_000).contains(&gap),
        "{refused}"
    );
    assert!(!text.contains("re-created?"), "{text}");

    for (shard, from) in [("shard-0", 6), ("shard-1", 6), ("shard-2", 3)] {
        let device = counted
            .entity_by_name(shardflow::msg::EntityType::Device, shard)
            .unwrap();
        assert_eq!(
            counted.history_count(device.id).unwrap(),
            (RECORDS + 1 - from) as i64,
            "{shard}"
        );
    }
    std::io::stdout().flush().unwrap();
}
