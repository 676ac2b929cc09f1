//! `shardflow bench`: measures the pipeline, the converter and the Kinesis
//! path on this machine, prints a table and writes it as JSON.
//!
//! Parts, all in one run so that ratios hold on a noisy machine:
//! 1. the whole pipeline fed by an in-process shard reader (walkthrough
//!    records, 1,000 devices, the walkthrough converter, the shipped root
//!    chain, SQLite with durable commits);
//! 2. through a Kinesis emulator running as its own process: a plain
//!    GetRecords drain versus shardflow draining the same backlog, and the
//!    same with enhanced fan-out (a plain SubscribeToShard drain versus
//!    shardflow with `use_enhanced_fan_out`);
//! 3. the converter alone in QuickJS versus Node.js on the same records;
//! 4. scaling with converter workers and shard counts;
//! 5. put-to-stored latency under light load through the emulator.
//!
//! Parts 2 and 5 need `--endpoint` (scripts/bench starts the emulator).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use bytes::Bytes;
use futures::future::BoxFuture;
use serde_json::{json, Value};

use crate::config::{Config, IntegrationConfig};
use crate::convert::js::{JsArg, JsLimits, JsRuntime};
use crate::kinesis::reader::{
    Fetched, KinesisReader, Position, RawRecord, ReadError, ShardInfo, ShardReader,
};
use crate::service::Pipeline;
use crate::store::Store;

const UPLINK: &str = include_str!("../converters/kinesis_converter.js");
const DOWNLINK: &str = include_str!("../converters/kinesis_downlink_version.js");
const ROOT_CHAIN: &str = include_str!("../rulechains/root.json");
const DEVICES: usize = 1000;

/// What to run.
pub struct BenchOptions {
    /// Records for the pipeline and emulator parts.
    pub records: usize,
    /// Backlog for the 16-shard memory run.
    pub backlog: usize,
    /// A Kinesis emulator to use for parts 2 and 5.
    pub endpoint: Option<String>,
    /// Where the JSON results go.
    pub out: PathBuf,
    /// The Node.js binary for part 3.
    pub node: String,
    /// Light-load latency: records and rate.
    pub latency_records: usize,
    pub latency_rate: f64,
    /// Which parts to run (1..=5); empty means all.
    pub parts: Vec<u8>,
}

impl BenchOptions {
    fn runs(&self, part: u8) -> bool {
        self.parts.is_empty() || self.parts.contains(&part)
    }
}

/// A walkthrough-shaped record of about `size` bytes.
fn record(i: usize, size: usize) -> Vec<u8> {
    let mut body = json!({
        "devName": format!("thermostat_{:04}", i % DEVICES),
        "devType": "thermostat",
        "temperature": 18 + (i % 10) as i64,
        "humidity": 40 + (i % 7) as i64,
        "seq": i,
    });
    let base = body.to_string().len();
    if size > base + 12 {
        body["note"] = Value::String("x".repeat(size - base - 12));
    }
    body.to_string().into_bytes()
}

/// An in-process shard source: `per_shard` generated records per shard,
/// no pacing.
struct GeneratedReader {
    shards: usize,
    per_shard: usize,
    size: usize,
    /// Records per second per shard made available; `None`: all at once
    /// (a backlog).
    offered_per_shard: Option<f64>,
    started: Instant,
}

impl GeneratedReader {
    fn new(shards: usize, per_shard: usize, size: usize, offered_total: Option<f64>) -> Self {
        GeneratedReader {
            shards,
            per_shard,
            size,
            offered_per_shard: offered_total.map(|r| r / shards as f64),
            started: Instant::now(),
        }
    }

    /// Records of one shard that exist by now.
    fn available(&self) -> usize {
        match self.offered_per_shard {
            None => self.per_shard,
            Some(rate) => {
                ((self.started.elapsed().as_secs_f64() * rate) as usize).min(self.per_shard)
            }
        }
    }
}

impl ShardReader for GeneratedReader {
    fn shards(&self, _: &str) -> BoxFuture<'static, Result<Vec<ShardInfo>, ReadError>> {
        let shards = (0..self.shards)
            .map(|s| ShardInfo {
                id: format!("shardId-{s:012}"),
                parents: Vec::new(),
                hash_range: None,
            })
            .collect();
        Box::pin(async move { Ok(shards) })
    }

    fn created_ms(&self, _: &str) -> BoxFuture<'static, Result<Option<i64>, ReadError>> {
        Box::pin(async { Ok(None) })
    }

    fn iterator(
        &self,
        _: &str,
        shard: &str,
        position: &Position,
    ) -> BoxFuture<'static, Result<Option<String>, ReadError>> {
        let index: usize = shard.trim_start_matches("shardId-").parse().unwrap_or(0);
        let offset = match position {
            Position::After(sequence) | Position::At(sequence) => {
                sequence.parse::<usize>().unwrap_or(0) % 1_000_000_000
            }
            Position::Initial(_) => 0,
        };
        Box::pin(async move { Ok(Some(format!("{index}:{offset}"))) })
    }

    fn records(
        &self,
        iterator: String,
        limit: i32,
    ) -> BoxFuture<'static, Result<Fetched, ReadError>> {
        let (shard, offset) = iterator.split_once(':').unwrap_or(("0", "0"));
        let shard: usize = shard.parse().unwrap_or(0);
        let offset: usize = offset.parse().unwrap_or(0);
        let available = self.available();
        let count = (limit as usize).min(available.saturating_sub(offset));
        let now = crate::msg::now_millis();
        let records = (offset..offset + count)
            .map(|n| RawRecord {
                // Shard-unique, increasing, and decodable back to the offset.
                sequence_number: format!("{}", (shard + 1) * 1_000_000_000 + n + 1),
                partition_key: format!("k{}", n % DEVICES),
                arrival_ms: now,
                data: Bytes::from(record(shard * self.per_shard + n, self.size)),
            })
            .collect();
        let next = offset + count;
        let behind = if next < available { 1000 } else { 0 };
        Box::pin(async move {
            Ok(Fetched {
                records,
                next_iterator: Some(format!("{shard}:{next}")),
                millis_behind_latest: Some(behind),
            })
        })
    }

    fn call_interval(&self) -> Duration {
        Duration::ZERO
    }
}

/// One pipeline run's figures.
#[derive(Debug, Clone)]
struct PipelineRun {
    records: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_mb: f64,
}

impl PipelineRun {
    fn rate(&self) -> f64 {
        self.records as f64 / self.seconds
    }

    fn json(&self) -> Value {
        json!({"records": self.records, "seconds": self.seconds, "records_per_s": self.rate(),
               "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "peak_rss_mb": self.peak_rss_mb})
    }
}

/// A temporary service directory with the walkthrough's files.
fn workspace(
    dir: &Path,
    stream: &str,
    endpoint: &str,
    max_records: usize,
    fan_out: bool,
) -> anyhow::Result<Config> {
    std::fs::create_dir_all(dir.join("converters"))?;
    std::fs::create_dir_all(dir.join("rulechains"))?;
    std::fs::write(dir.join("converters/uplink.js"), UPLINK)?;
    std::fs::write(dir.join("converters/downlink.js"), DOWNLINK)?;
    std::fs::write(dir.join("rulechains/root.json"), ROOT_CHAIN)?;
    let text = format!(
        r#"
[http]
bind = "127.0.0.1:0"
[[integration]]
name = "kinesis_integration"
uplink_converter = "converters/uplink.js"
downlink_converter = "converters/downlink.js"
stream_name = "{stream}"
access_key_id = "bench"
secret_access_key = "bench"
initial_position = "TRIM_HORIZON"
max_records = {max_records}
endpoint_url = "{endpoint}"
use_enhanced_fan_out = {fan_out}
"#
    );
    let path = dir.join("shardflow.toml");
    std::fs::write(&path, text)?;
    Ok(Config::load(&path)?)
}

async fn run_pipeline(
    io: &tokio::runtime::Handle,
    config: &Config,
    reader: Option<Arc<dyn ShardReader>>,
    total: usize,
) -> anyhow::Result<PipelineRun> {
    let source = crate::service::preflight(config)
        .map_err(|problems| anyhow::anyhow!(problems.join("; ")))?;
    let store = Store::open(&config.data_dir)?;
    reset_peak_rss();
    let kinesis_io = io.clone();
    let factory = move |config: &IntegrationConfig, client: &aws_sdk_kinesis::Client| match &reader
    {
        Some(reader) => reader.clone(),
        None => crate::kinesis::reader_for(config, client, &kinesis_io),
    };
    let started = Instant::now();
    let pipeline = Pipeline::start(config, source, store, io.clone(), &factory).await?;
    let deadline = started + Duration::from_secs(1800);
    while pipeline.status.records_done.load(Ordering::Relaxed) < total as u64 {
        if Instant::now() > deadline {
            bail!("pipeline did not finish {total} records in time");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let latency = &pipeline.status.handover_latency;
    let run = PipelineRun {
        records: total,
        seconds,
        p50_ms: latency.quantile(0.5).unwrap_or_default().as_secs_f64() * 1000.0,
        p99_ms: latency.quantile(0.99).unwrap_or_default().as_secs_f64() * 1000.0,
        peak_rss_mb: peak_rss_mb(),
    };
    pipeline.stop().await?;
    Ok(run)
}

async fn generated_run(
    io: &tokio::runtime::Handle,
    shards: usize,
    total: usize,
    size: usize,
) -> anyhow::Result<PipelineRun> {
    generated_run_at(io, shards, total, size, None).await
}

/// A pipeline run fed by the in-process reader, as a backlog or at an
/// offered rate (records per second, all shards).
async fn generated_run_at(
    io: &tokio::runtime::Handle,
    shards: usize,
    total: usize,
    size: usize,
    offered: Option<f64>,
) -> anyhow::Result<PipelineRun> {
    let dir = tempfile::tempdir()?;
    let config = workspace(dir.path(), "generated", "http://127.0.0.1:9", 10_000, false)?;
    let reader = Arc::new(GeneratedReader::new(shards, total / shards, size, offered));
    run_pipeline(io, &config, Some(reader), total / shards * shards).await
}

/// Converter throughput with `threads` workers: the best of three runs,
/// since a shared virtual machine's speed varies from second to second.
fn converter_rate(records: &[Vec<u8>], threads: usize) -> anyhow::Result<f64> {
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        best = best.max(converter_rate_once(records, threads)?);
    }
    Ok(best)
}

/// Converter throughput with `threads` workers, each with its own runtime.
fn converter_rate_once(records: &[Vec<u8>], threads: usize) -> anyhow::Result<f64> {
    let limits = JsLimits {
        call_timeout: Duration::from_secs(5),
        memory_limit_bytes: 256 << 20,
        max_result_bytes: 16 << 20,
    };
    let chunk = records.len().div_ceil(threads);
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = records
        .chunks(chunk)
        .map(|part| {
            let part = part.to_vec();
            let barrier = barrier.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut js = JsRuntime::new(limits)?;
                js.compile(
                    "uplink",
                    "kinesis_converter.js",
                    "Decoder",
                    "payload, metadata",
                    UPLINK,
                )?;
                let metadata: std::collections::BTreeMap<String, String> = [
                    ("integrationName", "bench"),
                    ("streamName", "bench"),
                    ("shardId", "shardId-000000000000"),
                    ("partitionKey", "k"),
                    ("sequenceNumber", "1"),
                    ("approximateArrivalTimestamp", "0"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
                let mut convert = |bytes: &[u8]| -> anyhow::Result<()> {
                    let out = js.call(
                        "uplink",
                        &[JsArg::Bytes(bytes), JsArg::StringMap(&metadata)],
                    )?;
                    crate::convert::uplink::parse(out)?;
                    Ok(())
                };
                for bytes in part.iter().take(1000) {
                    convert(bytes)?; // warm-up
                }
                barrier.wait();
                for bytes in &part {
                    convert(bytes)?;
                }
                Ok(())
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    for handle in handles {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("converter thread panicked"))??;
    }
    Ok(records.len() as f64 / started.elapsed().as_secs_f64())
}

const NODE_SCRIPT: &str = r#"
const fs = require('fs');
const lines = fs.readFileSync(process.argv[2], 'utf8').split('\n').filter(l => l.length > 0);
const body = fs.readFileSync(process.argv[3], 'utf8');
const Decoder = new Function('payload', 'metadata', body);
const buffers = lines.map(l => Buffer.from(l, 'utf8'));
function run() {
  let sink = 0;
  for (const buf of buffers) {
    const payload = new Array(buf.length);
    for (let i = 0; i < buf.length; i++) payload[i] = buf[i];
    const metadata = {integrationName: 'bench', streamName: 'bench', shardId: 'shardId-000000000000',
      partitionKey: 'k', sequenceNumber: '1', approximateArrivalTimestamp: '0'};
    sink += JSON.stringify(Decoder(payload, metadata)).length;
  }
  return sink;
}
run();
let best = 0;
for (let round = 0; round < 3; round++) {
  const t0 = process.hrtime.bigint();
  run();
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  best = Math.max(best, buffers.length / seconds);
}
console.log(JSON.stringify({rate: best}));
"#;

/// The same converter on the same records in Node.js, one core.
fn node_rate(node: &str, records: &[Vec<u8>]) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut lines = Vec::new();
    for r in records {
        lines.extend_from_slice(r);
        lines.push(b'\n');
    }
    std::fs::write(dir.path().join("records.txt"), lines)?;
    std::fs::write(dir.path().join("uplink.js"), UPLINK)?;
    std::fs::write(dir.path().join("bench.js"), NODE_SCRIPT)?;
    let output = std::process::Command::new(node)
        .arg(dir.path().join("bench.js"))
        .arg(dir.path().join("records.txt"))
        .arg(dir.path().join("uplink.js"))
        .output()
        .with_context(|| format!("cannot run {node}"))?;
    if !output.status.success() {
        bail!("node failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let result: Value = serde_json::from_slice(&output.stdout)?;
    result["rate"].as_f64().context("node printed no rate")
}

fn sdk_client(endpoint: &str) -> aws_sdk_kinesis::Client {
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
        .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "bench", "bench", None, None, "bench",
        ))
        .endpoint_url(endpoint)
        .build();
    aws_sdk_kinesis::Client::from_conf(config)
}

async fn create_stream(
    client: &aws_sdk_kinesis::Client,
    name: &str,
    shards: i32,
) -> anyhow::Result<()> {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await?;
    for _ in 0..600 {
        let summary = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await?;
        if summary
            .stream_description_summary()
            .map(|d| d.stream_status().as_str())
            == Some("ACTIVE")
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("stream {name} did not become ACTIVE")
}

async fn put_backlog(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    total: usize,
) -> anyhow::Result<()> {
    let batches: Vec<Vec<usize>> = (0..total)
        .collect::<Vec<_>>()
        .chunks(500)
        .map(<[usize]>::to_vec)
        .collect();
    let next = Arc::new(AtomicUsize::new(0));
    let batches = Arc::new(batches);
    let workers = (0..4).map(|_| {
        let (client, stream, next, batches) = (
            client.clone(),
            stream.to_string(),
            next.clone(),
            batches.clone(),
        );
        tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(batch) = batches.get(n) else {
                    return Ok::<_, anyhow::Error>(());
                };
                let mut pending: Vec<usize> = batch.clone();
                while !pending.is_empty() {
                    let entries = pending
                        .iter()
                        .map(|&i| {
                            PutRecordsRequestEntry::builder()
                                .partition_key(format!("k{}", i % DEVICES))
                                .data(Blob::new(record(i, 150)))
                                .build()
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let out = client
                        .put_records()
                        .stream_name(&stream)
                        .set_records(Some(entries))
                        .send()
                        .await?;
                    pending = pending
                        .into_iter()
                        .zip(out.records())
                        .filter(|(_, r)| r.error_code().is_some())
                        .map(|(i, _)| i)
                        .collect();
                }
            }
        })
    });
    for worker in futures::future::join_all(workers).await {
        worker??;
    }
    Ok(())
}

/// Runs `drain(client, shard, seen)` on every shard of the stream at once
/// until `total` records are seen; returns records per second.
async fn drain_each_shard<F, Fut>(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    total: usize,
    drain: F,
) -> anyhow::Result<f64>
where
    F: Fn(aws_sdk_kinesis::Client, String, Arc<AtomicUsize>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let shards = crate::kinesis::list_shards(client, stream)
        .await
        .map_err(|(c, m)| anyhow::anyhow!("{c}: {m}"))?;
    let seen = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks = shards.iter().map(|shard| {
        tokio::spawn(drain(
            client.clone(),
            shard.shard_id().to_string(),
            seen.clone(),
        ))
    });
    for task in futures::future::join_all(tasks).await {
        task??;
    }
    Ok(seen.load(Ordering::Relaxed).min(total) as f64 / started.elapsed().as_secs_f64())
}

/// Drains a stream with a plain GetRecords loop per shard, paced like the
/// consumer (one call per 200 ms per shard), doing nothing with records.
async fn plain_drain(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    total: usize,
) -> anyhow::Result<f64> {
    drain_each_shard(client, stream, total, |client, shard, seen| {
        let stream = stream.to_string();
        async move {
            let mut iterator = client
                .get_shard_iterator()
                .stream_name(&stream)
                .shard_id(&shard)
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await?
                .shard_iterator()
                .map(str::to_string);
            while let Some(it) = iterator {
                if seen.load(Ordering::Relaxed) >= total {
                    break;
                }
                let call = Instant::now();
                let out = client
                    .get_records()
                    .shard_iterator(it)
                    .limit(10_000)
                    .send()
                    .await?;
                seen.fetch_add(out.records().len(), Ordering::Relaxed);
                iterator = out.next_shard_iterator().map(str::to_string);
                let pause = Duration::from_millis(200).saturating_sub(call.elapsed());
                tokio::time::sleep(pause).await;
            }
            Ok(())
        }
    })
    .await
}

/// Drains a stream with one SubscribeToShard subscription per shard from
/// TRIM_HORIZON, doing nothing with records. The stream consumer is
/// registered as shardflow registers its own.
async fn plain_fan_out_drain(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    total: usize,
) -> anyhow::Result<f64> {
    use aws_sdk_kinesis::types::{StartingPosition, SubscribeToShardEventStream};
    let name = format!("bench-plain-{}", crate::msg::now_millis());
    let consumer = crate::kinesis::fan_out::register(client, stream, &name, "bench")
        .await
        .map_err(|(c, m)| anyhow::anyhow!("{c}: {m}"))?;
    drain_each_shard(client, stream, total, |client, shard, seen| {
        let consumer = consumer.clone();
        async move {
            let from = StartingPosition::builder()
                .r#type(ShardIteratorType::TrimHorizon)
                .build()?;
            let mut output = client
                .subscribe_to_shard()
                .consumer_arn(&consumer)
                .shard_id(&shard)
                .starting_position(from)
                .send()
                .await?;
            while seen.load(Ordering::Relaxed) < total {
                match output.event_stream.recv().await? {
                    Some(SubscribeToShardEventStream::SubscribeToShardEvent(event)) => {
                        seen.fetch_add(event.records().len(), Ordering::Relaxed);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            Ok(())
        }
    })
    .await
}

/// Put-to-stored latency: records put one at a time at `rate` per second.
async fn light_load_latency(
    io: &tokio::runtime::Handle,
    endpoint: &str,
    count: usize,
    rate: f64,
) -> anyhow::Result<(f64, f64)> {
    let client = sdk_client(endpoint);
    let stream = format!("bench-latency-{}", crate::msg::now_millis());
    create_stream(&client, &stream, 1).await?;
    let dir = tempfile::tempdir()?;
    let config = workspace(dir.path(), &stream, endpoint, 1000, false)?;
    let source = crate::service::preflight(&config)
        .map_err(|problems| anyhow::anyhow!(problems.join("; ")))?;
    let store = Store::open(&config.data_dir)?;
    let kinesis_io = io.clone();
    let factory = move |_: &IntegrationConfig, client: &aws_sdk_kinesis::Client| {
        Arc::new(KinesisReader {
            client: client.clone(),
            io: kinesis_io.clone(),
        }) as Arc<dyn ShardReader>
    };
    let pipeline = Pipeline::start(&config, source, store, io.clone(), &factory).await?;
    let done: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let sink = done.clone();
    let _ = pipeline
        .status
        .done_observer
        .set(Box::new(move |sequence: &str| {
            sink.lock()
                .expect("latency map")
                .insert(sequence.to_string(), Instant::now());
        }));
    while pipeline.status.readiness().is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut sent: Vec<(String, Instant)> = Vec::with_capacity(count);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    for i in 0..count {
        let due = started + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let at = Instant::now();
        let out = client
            .put_record()
            .stream_name(&stream)
            .partition_key("123")
            .data(Blob::new(record(i, 150)))
            .send()
            .await?;
        sent.push((out.sequence_number().to_string(), at));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.lock().expect("latency map").len() < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = done.lock().expect("latency map").clone();
    let mut latencies: Vec<f64> = sent
        .iter()
        .filter_map(|(seq, at)| {
            done.get(seq)
                .map(|d| d.duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    pipeline.stop().await?;
    if latencies.len() < count {
        bail!("only {} of {count} records were stored", latencies.len());
    }
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    Ok((pick(0.5), pick(0.99)))
}

/// Runs the 16-shard backlog in a child process (`bench --parts 6`) and
/// returns its figures.
fn backlog_in_child(backlog: usize) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("backlog.json");
    let status = std::process::Command::new(std::env::current_exe()?)
        .args([
            "bench",
            "--parts",
            "6",
            "--backlog",
            &backlog.to_string(),
            "--out",
        ])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("the backlog run failed: {status}");
    }
    let results: Value = serde_json::from_slice(&std::fs::read(&out)?)?;
    Ok(results["backlog_16_shards"].clone())
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Runs every part and reports.
pub async fn run(options: BenchOptions, io: tokio::runtime::Handle) -> anyhow::Result<()> {
    let mut results = serde_json::Map::new();
    let mut table: Vec<(String, String)> = Vec::new();
    let host = format!(
        "{} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_else(|| "unknown CPU".into())
    );
    results.insert("machine".into(), json!(host));

    // Part 1 also runs when part 2 needs its rate.
    let mut small_rate = f64::INFINITY;
    if options.runs(1) || options.runs(2) {
        eprintln!(
            "[1/5] pipeline, in-process source, {} records of ~150 B over 4 shards",
            options.records
        );
        let small = generated_run(&io, 4, options.records, 150).await?;
        table.push((
            "pipeline 150 B, 4 shards".into(),
            format!(
                "{:.0} rec/s, p50 {:.1} ms, p99 {:.1} ms, peak RSS {:.0} MB",
                small.rate(),
                small.p50_ms,
                small.p99_ms,
                small.peak_rss_mb
            ),
        ));
        results.insert("pipeline_150b".into(), small.json());
        small_rate = small.rate();

        // Latency at a rate the pipeline sustains: 50,000/s, or 90 % of
        // the backlog rate when that is lower.
        let offered = (0.9 * small.rate()).min(50_000.0);
        eprintln!("      and latency at an offered {offered:.0} records/s");
        let paced = generated_run_at(&io, 4, options.records, 150, Some(offered)).await?;
        table.push((
            format!("pipeline at {offered:.0} rec/s offered"),
            format!(
                "p50 {:.1} ms, p99 {:.1} ms (hand-over to commit)",
                paced.p50_ms, paced.p99_ms
            ),
        ));
        results.insert(
            "pipeline_150b_paced".into(),
            json!({"offered_per_s": offered, "run": paced.json()}),
        );
    }
    if options.runs(1) {
        let kb_records = (options.records / 4).max(1000);
        eprintln!("      and {kb_records} records of ~1 KB");
        let large = generated_run(&io, 4, kb_records, 1024).await?;
        table.push((
            "pipeline 1 KB, 4 shards".into(),
            format!(
                "{:.0} rec/s, p50 {:.1} ms, p99 {:.1} ms",
                large.rate(),
                large.p50_ms,
                large.p99_ms
            ),
        ));
        results.insert("pipeline_1kb".into(), large.json());
    }

    if let (Some(endpoint), true) = (&options.endpoint, options.runs(2)) {
        eprintln!(
            "[2/5] through the emulator at {endpoint}: {} records, 4 shards",
            options.records
        );
        let client = sdk_client(endpoint);
        let stream = format!("bench-{}", crate::msg::now_millis());
        create_stream(&client, &stream, 4).await?;
        put_backlog(&client, &stream, options.records).await?;
        let plain = plain_drain(&client, &stream, options.records).await?;
        let dir = tempfile::tempdir()?;
        let config = workspace(dir.path(), &stream, endpoint, 10_000, false)?;
        let drained = run_pipeline(&io, &config, None, options.records).await?;
        let ratio = drained.rate() / plain.min(small_rate);
        table.push((
            "plain GetRecords drain".into(),
            format!("{plain:.0} rec/s ({:.0} per shard)", plain / 4.0),
        ));
        table.push((
            "shardflow drain, polling (emulator)".into(),
            format!(
                "{:.0} rec/s ({:.0} per shard), peak RSS {:.0} MB, ratio {ratio:.2} of min(plain, pipeline)",
                drained.rate(),
                drained.rate() / 4.0,
                drained.peak_rss_mb
            ),
        ));

        // The same backlog again, with enhanced fan-out (new checkpoints).
        let plain_fan_out = plain_fan_out_drain(&client, &stream, options.records).await?;
        let dir = tempfile::tempdir()?;
        let config = workspace(dir.path(), &stream, endpoint, 10_000, true)?;
        let fanned = run_pipeline(&io, &config, None, options.records).await?;
        let fan_out_ratio = fanned.rate() / plain_fan_out.min(small_rate);
        table.push((
            "plain SubscribeToShard drain".into(),
            format!(
                "{plain_fan_out:.0} rec/s ({:.0} per shard)",
                plain_fan_out / 4.0
            ),
        ));
        table.push((
            "shardflow drain, fan-out (emulator)".into(),
            format!(
                "{:.0} rec/s ({:.0} per shard), peak RSS {:.0} MB, ratio {fan_out_ratio:.2} of min(plain, pipeline)",
                fanned.rate(),
                fanned.rate() / 4.0,
                fanned.peak_rss_mb
            ),
        ));
        results.insert(
            "emulator".into(),
            json!({"shards": 4, "plain_drain_per_s": plain, "shardflow": drained.json(), "ratio": ratio,
                   "plain_fan_out_per_s": plain_fan_out, "shardflow_fan_out": fanned.json(),
                   "fan_out_ratio": fan_out_ratio}),
        );
    } else {
        eprintln!("[2/5] skipped: no --endpoint");
    }

    let converter_records: Vec<Vec<u8>> = (0..options.records.min(100_000))
        .map(|i| record(i, 150))
        .collect();
    let one = if options.runs(3) || options.runs(4) {
        converter_rate(&converter_records, 1)?
    } else {
        0.0
    };
    if options.runs(3) {
        eprintln!("[3/5] converter alone: shardflow (QuickJS) vs Node.js");
        let node = node_rate(&options.node, &converter_records);
        match &node {
            Ok(node) => {
                table.push((
                    "converter, QuickJS, 1 worker".into(),
                    format!("{one:.0} rec/s"),
                ));
                table.push((
                    "converter, Node.js".into(),
                    format!("{node:.0} rec/s, ratio {:.2}", one / node),
                ));
                results.insert(
                    "converter".into(),
                    json!({"shardflow_per_s": one, "node_per_s": node, "ratio": one / node}),
                );
            }
            Err(e) => {
                table.push((
                    "converter, QuickJS, 1 worker".into(),
                    format!("{one:.0} rec/s (Node.js: {e})"),
                ));
                results.insert(
                    "converter".into(),
                    json!({"shardflow_per_s": one, "node_error": e.to_string()}),
                );
            }
        }
    }

    if options.runs(4) {
        eprintln!("[4/5] scaling");
        let two = converter_rate(&converter_records, 2)?;
        table.push((
            "converter, 2 workers".into(),
            format!("{two:.0} rec/s, {:.2}x one worker", two / one),
        ));
        let mut scaling = serde_json::Map::new();
        scaling.insert("converter_2_workers_per_s".into(), json!(two));
        scaling.insert("converter_speedup".into(), json!(two / one));
        for shards in [1usize, 16] {
            let run = generated_run(&io, shards, options.records, 150).await?;
            table.push((
                format!("pipeline, {shards} shard(s)"),
                format!("{:.0} rec/s", run.rate()),
            ));
            scaling.insert(format!("pipeline_{shards}_shards"), run.json());
        }
        eprintln!(
            "      memory: 16 shards, backlog of {} records",
            options.backlog
        );
        // In a process of its own, so its peak RSS is not that of the
        // runs before it.
        let backlog = backlog_in_child(options.backlog)?;
        table.push((
            "16 shards, backlog (own process)".into(),
            format!(
                "{} records, {:.0} rec/s, peak RSS {:.0} MB",
                backlog["records"],
                backlog["records_per_s"].as_f64().unwrap_or(0.0),
                backlog["peak_rss_mb"].as_f64().unwrap_or(0.0)
            ),
        ));
        scaling.insert("backlog_16_shards".into(), backlog);
        results.insert("scaling".into(), Value::Object(scaling));
    }

    if options.parts == [6] {
        // The memory run alone (see backlog_in_child).
        let backlog = generated_run(&io, 16, options.backlog, 150).await?;
        results.insert("backlog_16_shards".into(), backlog.json());
    }

    if let (Some(endpoint), true) = (&options.endpoint, options.runs(5)) {
        eprintln!(
            "[5/5] light-load latency: {} records at {}/s",
            options.latency_records, options.latency_rate
        );
        let (p50, p99) =
            light_load_latency(&io, endpoint, options.latency_records, options.latency_rate)
                .await?;
        table.push((
            "put-to-stored latency, polling".into(),
            format!("p50 {p50:.0} ms, p99 {p99:.0} ms"),
        ));
        results.insert("latency".into(), json!({"records": options.latency_records, "rate": options.latency_rate, "p50_ms": p50, "p99_ms": p99}));
    } else {
        eprintln!("[5/5] skipped: no --endpoint");
    }

    println!("\nshardflow bench on {host}\n");
    let width = table.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (name, value) in &table {
        println!("  {name:<width$}  {value}");
    }
    if let Some(parent) = options.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        &options.out,
        serde_json::to_string_pretty(&Value::Object(results))?,
    )?;
    println!("\nwritten to {}", options.out.display());
    Ok(())
}
