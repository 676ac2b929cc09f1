//! In-process pipelines fed by a stand-in shard reader, for the faults a
//! real Kinesis cannot be made to produce: the real consumer, converter
//! pool, chain and store run; only the reader is replaced.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;

use shardflow::config::{Config, IntegrationConfig};
use shardflow::kinesis::reader::{Fetched, Position, RawRecord, ReadError, ShardInfo, ShardReader};
use shardflow::service::Pipeline;
use shardflow::store::Store;

/// A service directory in `dir`: `converter` as the uplink converter, the
/// shipped downlink converter and root chain, and a config with `top`
/// (top-level keys and tables) and `integration` (more keys of the one
/// integration, whose stream is `stream`).
pub fn workspace(
    dir: &Path,
    stream: &str,
    converter: &str,
    top: &str,
    integration: &str,
) -> Config {
    let repo = super::repo();
    std::fs::create_dir_all(dir.join("converters")).unwrap();
    std::fs::create_dir_all(dir.join("rulechains")).unwrap();
    std::fs::write(dir.join("converters/up.js"), converter).unwrap();
    std::fs::copy(
        repo.join("converters/kinesis_downlink_version.js"),
        dir.join("converters/down.js"),
    )
    .unwrap();
    std::fs::copy(
        repo.join("rulechains/root.json"),
        dir.join("rulechains/root.json"),
    )
    .unwrap();
    let text = format!(
        r#"
root_chain = "rulechains/root.json"
{top}
[[integration]]
name = "kinesis_integration"
uplink_converter = "converters/up.js"
downlink_converter = "converters/down.js"
stream_name = "{stream}"
access_key_id = "test"
secret_access_key = "test"
endpoint_url = "http://127.0.0.1:9"
{integration}
"#
    );
    std::fs::write(dir.join("shardflow.toml"), text).unwrap();
    Config::load(&dir.join("shardflow.toml")).unwrap()
}

/// Runs the pipeline, with the readers `reader` makes, until
/// `until(store, records done)` holds (90 s at most), then stops it;
/// returns the store.
pub fn run_until(
    config: &Config,
    reader: impl Fn(&IntegrationConfig, &tokio::runtime::Handle) -> Arc<dyn ShardReader> + 'static,
    mut until: impl FnMut(&Store, u64) -> bool,
) -> Store {
    let source = shardflow::service::preflight(config).unwrap();
    let store = Store::open(&config.data_dir).unwrap();
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handle = io.handle().clone();
    let kept = store.clone();
    actix::System::new().block_on(async move {
        let reader_io = handle.clone();
        let factory =
            move |c: &IntegrationConfig, _: &aws_sdk_kinesis::Client| reader(c, &reader_io);
        let pipeline = Pipeline::start(config, source, store.clone(), handle, &factory)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let done = pipeline.status.records_done.load(Ordering::SeqCst);
            if until(&store, done) {
                break;
            }
            assert!(Instant::now() < deadline, "records done: {done}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pipeline.stop().await.unwrap();
    });
    kept
}

/// One shard serving `payloads` in order, `per_call` at a time; record `n`
/// has sequence number `n + 1`, partition key `k{n}`. `fault` may fail the
/// `records` call with its number (from 1); `ends`: SHARD_END after the
/// last record (else the shard stays open). Every position asked for is
/// kept in `positions`.
pub struct PayloadReader {
    pub shard: ShardInfo,
    pub payloads: Vec<Vec<u8>>,
    pub per_call: usize,
    pub ends: bool,
    pub fault: fn(usize) -> Option<ReadError>,
    pub calls: AtomicUsize,
    pub positions: Mutex<Vec<String>>,
}

impl PayloadReader {
    /// `shardId-000000000000`, no parents, 10 per call, open, no faults.
    pub fn new(payloads: Vec<Vec<u8>>) -> PayloadReader {
        PayloadReader {
            shard: ShardInfo {
                id: "shardId-000000000000".into(),
                parents: vec![],
                hash_range: None,
            },
            payloads,
            per_call: 10,
            ends: false,
            fault: |_| None,
            calls: AtomicUsize::new(0),
            positions: Mutex::new(Vec::new()),
        }
    }
}

impl ShardReader for PayloadReader {
    fn shards(&self, _: &str) -> BoxFuture<'static, Result<Vec<ShardInfo>, ReadError>> {
        let shard = self.shard.clone();
        Box::pin(async move { Ok(vec![shard]) })
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
        if let Some(error) = (self.fault)(call) {
            return Box::pin(async move { Err(error) });
        }
        let total = self.payloads.len();
        let offset: usize = iterator.parse().unwrap();
        let count = (limit as usize).min(self.per_call).min(total - offset);
        let records = (offset..offset + count)
            .map(|n| RawRecord {
                sequence_number: (n + 1).to_string(),
                partition_key: format!("k{n}"),
                arrival_ms: 1_700_000_000_000 + n as i64,
                data: Bytes::from(self.payloads[n].clone()),
            })
            .collect();
        let next = offset + count;
        let fetched = Fetched {
            records,
            next_iterator: (next < total || !self.ends).then(|| next.to_string()),
            millis_behind_latest: Some(if next < total { 1000 } else { 0 }),
        };
        Box::pin(async move { Ok(fetched) })
    }

    fn call_interval(&self) -> Duration {
        Duration::from_millis(1)
    }
}
