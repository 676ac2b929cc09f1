//! Test harness: a real Kinesis emulator (ferrokinesis, in-process on a free
//! port), the real shardflow binary as a child process with its own data
//! directory and config, and a real HTTP client for its API.

#![allow(dead_code)]

pub mod engine;
pub mod standin;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::Client;
use serde_json::{json, Value};

pub const WALKTHROUGH_RECORD: &str =
    r#"{"devName": "kitchen_thermostat", "devType": "thermostat", "temperature": 22}"#;

/// A ferrokinesis emulator serving on 127.0.0.1 on its own thread.
pub struct Emulator {
    pub endpoint: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Emulator {
    pub fn start() -> Emulator {
        Emulator::start_with(|_| {})
    }

    /// An emulator with some of its options changed (session length of
    /// SubscribeToShard, enforced throughput limits...).
    pub fn start_with(
        change: impl FnOnce(&mut ferrokinesis::store::StoreOptions) + Send + 'static,
    ) -> Emulator {
        Emulator::start_at("127.0.0.1:0", change)
    }

    /// A new, empty emulator at `address` (an emulator restarted on the
    /// port of one that was stopped).
    pub fn start_at(
        address: &str,
        change: impl FnOnce(&mut ferrokinesis::store::StoreOptions) + Send + 'static,
    ) -> Emulator {
        let address = address.to_string();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut options = ferrokinesis::store::StoreOptions {
                    create_stream_ms: 20,
                    delete_stream_ms: 20,
                    update_stream_ms: 20,
                    shard_limit: 64,
                    ..Default::default()
                };
                change(&mut options);
                let (app, _store) = ferrokinesis::create_app(options);
                let listener = tokio::net::TcpListener::bind(&address).await.unwrap();
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                ferrokinesis::serve_plain_http(listener, app, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let address = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("emulator starts");
        Emulator {
            endpoint: format!("http://{address}"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub async fn client(&self) -> Client {
        kinesis_client(&self.endpoint)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Creates a stream and waits until it is ACTIVE.
pub async fn create_stream(client: &Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .expect("create stream");
    wait_for(
        "stream to become ACTIVE",
        Duration::from_secs(30),
        || async {
            let out = client
                .describe_stream_summary()
                .stream_name(name)
                .send()
                .await
                .ok()?;
            let status = out
                .stream_description_summary()?
                .stream_status()
                .as_str()
                .to_string();
            (status == "ACTIVE").then_some(())
        },
    )
    .await;
}

pub async fn put(client: &Client, stream: &str, partition_key: &str, data: &[u8]) -> String {
    client
        .put_record()
        .stream_name(stream)
        .partition_key(partition_key)
        .data(Blob::new(data.to_vec()))
        .send()
        .await
        .expect("put record")
        .sequence_number()
        .to_string()
}

/// PutRecords entries of (partition key, data) pairs.
fn entries<'a>(
    records: impl IntoIterator<Item = &'a (String, Vec<u8>)>,
) -> Vec<aws_sdk_kinesis::types::PutRecordsRequestEntry> {
    records
        .into_iter()
        .map(|(key, data)| {
            aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                .partition_key(key)
                .data(Blob::new(data.clone()))
                .build()
                .unwrap()
        })
        .collect()
}

/// Puts many records with PutRecords, in batches of up to 500.
pub async fn put_many(client: &Client, stream: &str, records: &[(String, Vec<u8>)]) {
    for chunk in records.chunks(500) {
        let out = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries(chunk)))
            .send()
            .await
            .expect("put records");
        assert_eq!(out.failed_record_count(), Some(0));
    }
}

/// A KPL aggregated record (magic, protobuf `AggregatedRecord`, MD5 of
/// the message) of `(partition key, explicit hash key, data)` user records,
/// written here for the tests, independently of the decoder under test.
pub fn kpl_aggregate(records: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut value: u64) {
        loop {
            let byte = (value & 0x7F) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn length_delimited(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
        varint(out, (field << 3) | 2);
        varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }
    fn index(table: &mut Vec<String>, key: &str) -> u64 {
        match table.iter().position(|k| k == key) {
            Some(i) => i as u64,
            None => {
                table.push(key.to_string());
                table.len() as u64 - 1
            }
        }
    }
    let mut keys: Vec<String> = Vec::new();
    let mut hash_keys: Vec<String> = Vec::new();
    let mut encoded_records = Vec::new();
    for (key, hash_key, data) in records {
        let mut record = Vec::new();
        varint(&mut record, 1 << 3);
        varint(&mut record, index(&mut keys, key));
        if let Some(hash_key) = hash_key {
            varint(&mut record, 2 << 3);
            varint(&mut record, index(&mut hash_keys, hash_key));
        }
        length_delimited(&mut record, 3, data);
        encoded_records.push(record);
    }
    let mut message = Vec::new();
    for key in &keys {
        length_delimited(&mut message, 1, key.as_bytes());
    }
    for key in &hash_keys {
        length_delimited(&mut message, 2, key.as_bytes());
    }
    for record in &encoded_records {
        length_delimited(&mut message, 3, record);
    }
    use md5::Digest;
    let mut out = vec![0xF3, 0x89, 0x9A, 0xC2];
    out.extend_from_slice(&message);
    out.extend_from_slice(&md5::Md5::digest(&message));
    out
}

/// Puts one record with an explicit hash key.
pub async fn put_with_hash_key(
    client: &Client,
    stream: &str,
    partition_key: &str,
    explicit_hash_key: &str,
    data: &[u8],
) -> String {
    client
        .put_record()
        .stream_name(stream)
        .partition_key(partition_key)
        .explicit_hash_key(explicit_hash_key)
        .data(Blob::new(data.to_vec()))
        .send()
        .await
        .expect("put record")
        .sequence_number()
        .to_string()
}

/// The text of `/metrics`.
pub async fn metrics(service: &Service) -> String {
    service
        .http
        .get(format!("{}/metrics", service.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Puts many records with PutRecords, putting rejected entries again (for
/// an emulator that enforces the shard write limits).
pub async fn put_many_retrying(client: &Client, stream: &str, records: &[(String, Vec<u8>)]) {
    for chunk in records.chunks(500) {
        let mut pending: Vec<&(String, Vec<u8>)> = chunk.iter().collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !pending.is_empty() {
            assert!(Instant::now() < deadline, "records not accepted in time");
            let out = client
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries(pending.iter().copied())))
                .send()
                .await
                .expect("put records");
            pending = pending
                .into_iter()
                .zip(out.records())
                .filter(|(_, result)| result.error_code().is_some())
                .map(|(record, _)| record)
                .collect();
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Every record of every shard of a stream, read from TRIM_HORIZON.
pub async fn read_all(client: &Client, stream: &str) -> Vec<aws_sdk_kinesis::types::Record> {
    read_by_shard(client, stream)
        .await
        .into_values()
        .flatten()
        .collect()
}

/// Every record of a stream by shard id, read from TRIM_HORIZON.
pub async fn read_by_shard(
    client: &Client,
    stream: &str,
) -> std::collections::BTreeMap<String, Vec<aws_sdk_kinesis::types::Record>> {
    let shards = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .unwrap();
    let mut by_shard = std::collections::BTreeMap::new();
    for shard in shards.shards() {
        let mut records = Vec::new();
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator()
            .map(str::to_string);
        while let Some(it) = iterator {
            let out = client
                .get_records()
                .shard_iterator(it)
                .send()
                .await
                .unwrap();
            let empty = out.records().is_empty();
            records.extend(out.records().iter().cloned());
            iterator = out.next_shard_iterator().map(str::to_string);
            if empty && out.millis_behind_latest() == Some(0) {
                break;
            }
        }
        by_shard.insert(shard.shard_id().to_string(), records);
    }
    by_shard
}

/// Polls `probe` until it yields a value, or panics after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Options for a service instance's config.
#[derive(Clone)]
pub struct Setup {
    pub stream: String,
    pub downlink_stream: String,
    pub initial_position: &'static str,
    pub uplink_converter: String,
    pub downlink_converter: String,
    pub root_chain: String,
    /// Top-level config text (before `[http]`), e.g. a `[rules]` table.
    pub extra: String,
    /// More keys of the `[http]` table.
    pub http_extra: String,
    /// More `[pipeline]` keys.
    pub pipeline_extra: String,
    /// More keys of the `[[integration]]` table.
    pub integration_extra: String,
    /// The integration's credential keys (static test keys by default).
    pub credentials: String,
    /// Kinesis endpoint, when not the emulator's own (a proxy in front).
    pub endpoint: Option<String>,
    /// Environment of the service process, on top of a clean AWS one.
    pub env: Vec<(String, String)>,
}

impl Setup {
    /// The walkthrough's converters and root chain, shipped with the repo.
    pub fn walkthrough(stream: &str) -> Setup {
        let repo = repo();
        Setup {
            stream: stream.into(),
            downlink_stream: "tb-test-downlink".into(),
            initial_position: "TRIM_HORIZON",
            uplink_converter: read(&repo.join("converters/kinesis_converter.js")),
            downlink_converter: read(&repo.join("converters/kinesis_downlink_version.js")),
            root_chain: read(&repo.join("rulechains/root.json")),
            extra: String::new(),
            http_extra: String::new(),
            pipeline_extra: String::new(),
            integration_extra: String::new(),
            credentials: "access_key_id = \"test\"\nsecret_access_key = \"test\"".into(),
            endpoint: None,
            env: Vec::new(),
        }
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// A running shardflow process with its own directory.
pub struct Service {
    pub dir: PathBuf,
    pub base_url: String,
    child: Option<Child>,
    _temp: Option<tempfile::TempDir>,
    pub http: reqwest::Client,
    token: Option<String>,
}

/// Writes a config and its files into `dir`; returns the config path.
pub fn write_config(dir: &Path, setup: &Setup, endpoint: &str, port: u16) -> PathBuf {
    std::fs::create_dir_all(dir.join("converters")).unwrap();
    std::fs::create_dir_all(dir.join("rulechains")).unwrap();
    std::fs::write(dir.join("converters/uplink.js"), &setup.uplink_converter).unwrap();
    std::fs::write(
        dir.join("converters/downlink.js"),
        &setup.downlink_converter,
    )
    .unwrap();
    std::fs::write(dir.join("rulechains/root.json"), &setup.root_chain).unwrap();
    let config = format!(
        r#"
data_dir = "data"
root_chain = "rulechains/root.json"
{extra}
[http]
bind = "127.0.0.1:{port}"
username = "tenant@thingsboard.org"
password = "tenant"
{http_extra}

[pipeline]
checkpoint_interval_ms = 200
shard_sync_interval_ms = 300
{pipeline_extra}

[[integration]]
name = "kinesis_integration"
uplink_converter = "converters/uplink.js"
downlink_converter = "converters/downlink.js"
stream_name = "{stream}"
region = "us-east-1"
{credentials}
application_name = "shardflow-test"
initial_position = "{position}"
max_records = 500
endpoint_url = "{endpoint}"
{integration_extra}
"#,
        extra = setup.extra,
        http_extra = setup.http_extra,
        pipeline_extra = setup.pipeline_extra,
        integration_extra = setup.integration_extra,
        credentials = setup.credentials,
        endpoint = setup.endpoint.as_deref().unwrap_or(endpoint),
        stream = setup.stream,
        position = setup.initial_position,
    );
    let path = dir.join("shardflow.toml");
    std::fs::write(&path, config).unwrap();
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_shardflow")
}

/// Runs the shardflow binary with `args` and `--config CONFIG`; returns
/// whether it succeeded, its exit code, and stdout followed by stderr.
pub fn run_binary(args: &[&str], config: &Path) -> (Option<i32>, String) {
    let output = Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

impl Service {
    /// Writes the config into a new temporary directory and starts the
    /// service; waits until `/ready`.
    pub async fn start(setup: &Setup, emulator: &Emulator) -> Service {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        let mut service = Service::start_in(&dir, setup, emulator).await;
        service._temp = Some(temp);
        service
    }

    /// Starts (or restarts) the service in `dir`; waits until `/ready`.
    pub async fn start_in(dir: &Path, setup: &Setup, emulator: &Emulator) -> Service {
        let service = Service::launch_in(dir, setup, emulator);
        service.wait_ready().await;
        service
    }

    /// Starts the service in `dir` without waiting for it to be ready.
    pub fn launch_in(dir: &Path, setup: &Setup, emulator: &Emulator) -> Service {
        let port = free_port();
        let config = write_config(dir, setup, &emulator.endpoint, port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("service.log"))
            .unwrap();
        let mut command = Command::new(binary());
        command
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info");
        // No AWS settings from the machine: credentials, profiles and
        // endpoints are only what the test gives, and the instance metadata
        // service is never asked unless a test points it at a stand-in.
        for (name, _) in std::env::vars() {
            if name.starts_with("AWS_") {
                command.env_remove(name);
            }
        }
        command
            .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                dir.join("no-aws-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true");
        command.envs(setup.env.iter().map(|(k, v)| (k, v)));
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start shardflow");
        Service {
            dir: dir.to_path_buf(),
            base_url: format!("http://127.0.0.1:{port}"),
            child: Some(child),
            _temp: None,
            http: reqwest::Client::new(),
            token: None,
        }
    }

    /// The process's CPU time so far (user and system).
    pub fn cpu_time(&self) -> Duration {
        let pid = self.child.as_ref().expect("running").id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime and stime are fields 14 and 15, in clock ticks.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 1000 / clock_ticks_per_second())
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub async fn wait_ready(&self) {
        let url = format!("{}/ready", self.base_url);
        let http = self.http.clone();
        wait_for("service to be ready", Duration::from_secs(60), || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let response = http.get(&url).send().await.ok()?;
                response.status().is_success().then_some(())
            }
        })
        .await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("service.log")).unwrap_or_default()
    }

    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.dir.join("data/shardflow.db")).unwrap()
    }

    /// SIGKILL: no chance to drain or checkpoint.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "service did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn login(&mut self) -> String {
        if let Some(token) = &self.token {
            return token.clone();
        }
        let response: Value = self
            .http
            .post(format!("{}/api/auth/login", self.base_url))
            .json(&json!({"username": "tenant@thingsboard.org", "password": "tenant"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = response["token"].as_str().expect("token").to_string();
        self.token = Some(token.clone());
        token
    }

    /// The token after [`Service::login`], for requests built by hand.
    pub fn token_for_tests(&self) -> String {
        self.token.clone().expect("logged in")
    }

    pub async fn get(&mut self, path: &str) -> (u16, Value) {
        let token = self.login().await;
        let response = self
            .http
            .get(format!("{}{path}", self.base_url))
            .header("X-Authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&mut self, path: &str, body: &str) -> (u16, Value) {
        let token = self.login().await;
        let response = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header("X-Authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The device id once the device exists.
    pub async fn wait_device(&mut self, name: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self
                .get(&format!("/api/tenant/devices?deviceName={name}"))
                .await;
            if status == 200 {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "device {name} never appeared\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Latest telemetry once `key` is there (a device can be visible a
    /// moment before its first values are committed).
    pub async fn wait_latest(&mut self, device_id: &str, key: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let latest = self.latest(device_id, true).await;
            if latest.get(key).is_some() {
                return latest;
            }
            assert!(
                Instant::now() < deadline,
                "no {key} for {device_id}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn latest(&mut self, device_id: &str, strict: bool) -> Value {
        self.get(&format!(
            "/api/plugins/telemetry/DEVICE/{device_id}/values/timeseries?useStrictDataTypes={strict}"
        ))
        .await
        .1
    }

    /// Count of rows in a table, read from the SQLite file.
    pub fn count(&self, table: &str) -> i64 {
        self.db()
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

fn clock_ticks_per_second() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

/// A Kinesis client for a local endpoint, with test credentials.
pub fn kinesis_client(endpoint: &str) -> Client {
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
        .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .endpoint_url(endpoint)
        .build();
    Client::from_conf(config)
}

/// Deletes a stream (and its stream consumers), waits until it is gone,
/// and creates it again with `shards` shards.
pub async fn recreate_stream(client: &Client, stream: &str, shards: i32) {
    client
        .delete_stream()
        .stream_name(stream)
        .enforce_consumer_deletion(true)
        .send()
        .await
        .unwrap();
    wait_for("stream deleted", Duration::from_secs(30), || async {
        client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // Creation times have whole-second resolution in some emulators.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    create_stream(client, stream, shards).await;
}

/// How many distinct values of the telemetry key `seq` are stored.
pub fn distinct_seqs(service: &Service) -> i64 {
    service
        .db()
        .query_row(
            "SELECT count(DISTINCT long_v) FROM ts_kv WHERE key = 'seq'",
            [],
            |r| r.get(0),
        )
        .unwrap_or(0)
}

/// Waits (90 s at most) until `count` distinct `seq` values are stored.
pub async fn wait_distinct_seqs(service: &Service, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while distinct_seqs(service) < count {
        assert!(
            Instant::now() < deadline,
            "stored {} of {count}\n{}",
            distinct_seqs(service),
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
