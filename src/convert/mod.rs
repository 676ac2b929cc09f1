//! JavaScript converters: uplink (`Decoder`) and downlink (`Encoder`)
//! scripts, run on a pool of worker threads.
//!
//! Converters are pure: bytes and metadata in, typed results out. Each
//! worker is an actix `SyncArbiter` actor that owns one QuickJS runtime for
//! its whole life (runtimes are not `Send`). Scripts are compiled on a
//! worker the first time it sees a script version and reused after that.

pub mod downlink;
mod heap;
pub mod js;
pub mod uplink;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::delivery::SourceRecord;

pub use downlink::DownlinkRecord;
use js::{JsArg, JsError, JsLimits, JsRuntime};
pub use uplink::Uplink;

/// The role of a script, which fixes its function name and parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptKind {
    Decoder,
    Encoder,
    /// A rule node's script: `function Name(msg, metadata, msgType)`.
    RuleNode(&'static str),
    /// A generator node's script: `function Generate(prevMsg,
    /// prevMetadata, prevMsgType)`.
    Generator,
}

impl ScriptKind {
    fn signature(self) -> (&'static str, &'static str) {
        match self {
            ScriptKind::Decoder => ("Decoder", "payload, metadata"),
            ScriptKind::Encoder => ("Encoder", "msg, metadata, msgType, integrationMetadata"),
            ScriptKind::RuleNode(name) => (name, "msg, metadata, msgType"),
            ScriptKind::Generator => ("Generate", "prevMsg, prevMetadata, prevMsgType"),
        }
    }
}

/// A script's source, with a process-unique id so workers can cache its
/// compiled form.
#[derive(Debug)]
pub struct Script {
    pub id: u64,
    pub kind: ScriptKind,
    /// Where the script came from (a file, or a chain node), for errors.
    pub origin: String,
    pub body: String,
    /// Calls in a row (on any worker) that ran past their time or memory
    /// limit.
    stopped_calls: AtomicU32,
}

/// Calls in a row past their time or memory limit that put a script on
/// probation: each such call holds a worker for the whole time limit, so
/// a script that hangs on every record would hold every worker for every
/// record it gets.
const PROBATION_AFTER: u32 = 3;
/// The time limit of a call on probation. Calls that end within it take
/// the script off probation, so records the script handles quickly keep
/// flowing while those it hangs on fail fast.
const PROBATION_TIMEOUT: Duration = Duration::from_millis(50);

static NEXT_SCRIPT_ID: AtomicU64 = AtomicU64::new(1);

/// Ids of scripts that were dropped (replaced by a reload), so that every
/// worker forgets their compiled functions; `RETIRED_COUNT` lets a worker
/// see that there is something new without taking the lock.
static RETIRED: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());
static RETIRED_COUNT: AtomicU64 = AtomicU64::new(0);

impl Drop for Script {
    fn drop(&mut self) {
        RETIRED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.id);
        RETIRED_COUNT.fetch_add(1, Ordering::Release);
    }
}

impl Script {
    pub fn new(
        kind: ScriptKind,
        origin: impl Into<String>,
        body: impl Into<String>,
    ) -> Arc<Script> {
        Arc::new(Script {
            id: NEXT_SCRIPT_ID.fetch_add(1, Ordering::Relaxed),
            kind,
            origin: origin.into(),
            body: body.into(),
            stopped_calls: AtomicU32::new(0),
        })
    }

    /// The time limit of the next call: the runtime's, or the probation
    /// limit after `PROBATION_AFTER` calls in a row were stopped.
    fn call_timeout(&self, limit: Duration) -> Duration {
        if self.stopped_calls.load(Ordering::Acquire) >= PROBATION_AFTER {
            limit.min(PROBATION_TIMEOUT)
        } else {
            limit
        }
    }

    /// Counts a call's outcome for probation.
    fn record_call<T>(&self, result: &Result<T, JsError>) {
        match result {
            Err(JsError::Timeout(_) | JsError::OutOfMemory(_)) => {
                let stopped = self.stopped_calls.fetch_add(1, Ordering::AcqRel) + 1;
                if stopped == PROBATION_AFTER {
                    tracing::error!(
                        script = %self.origin, calls = stopped,
                        "the script was stopped at its time or memory limit {stopped} times in a row: its calls now get {} ms until one ends in time",
                        PROBATION_TIMEOUT.as_millis()
                    );
                }
            }
            _ => {
                if self.stopped_calls.swap(0, Ordering::AcqRel) >= PROBATION_AFTER {
                    tracing::info!(script = %self.origin, "the script ended a call in time: off probation");
                }
            }
        }
    }
}

/// Compiles scripts in one throw-away runtime; returns the index and error
/// of each that does not compile.
pub fn check_all(scripts: &[&Script], limits: JsLimits) -> Result<Vec<(usize, JsError)>, JsError> {
    if scripts.is_empty() {
        return Ok(Vec::new());
    }
    let mut runtime = JsRuntime::new(limits)?;
    let mut errors = Vec::new();
    for (i, script) in scripts.iter().enumerate() {
        let (name, params) = script.kind.signature();
        if let Err(e) = runtime.compile("check", &script.origin, name, params, &script.body) {
            errors.push((i, e));
        }
    }
    Ok(errors)
}

/// Why a converter could not produce a result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConvertError {
    #[error("{0}")]
    Script(#[from] JsError),
    #[error("{0}")]
    Uplink(#[from] uplink::UplinkError),
    #[error("{0}")]
    Downlink(#[from] downlink::DownlinkError),
    #[error("the converter pool is not running")]
    PoolGone,
}

/// One record to decode.
pub struct DecodeInput {
    /// The record: its payload, and the fields of the `metadata` object
    /// ThingsBoard's Kinesis integration gives `Decoder`.
    pub record: Arc<SourceRecord>,
}

/// Decodes a batch of records, in order, with one converter.
pub struct Decode {
    pub script: Arc<Script>,
    pub records: Vec<DecodeInput>,
}

impl Message for Decode {
    type Result = Vec<Result<Vec<Uplink>, ConvertError>>;
}

/// Encodes one rule-engine message into downlink records.
pub struct Encode {
    pub script: Arc<Script>,
    pub data: String,
    pub metadata: BTreeMap<String, String>,
    pub msg_type: String,
    pub integration_metadata: BTreeMap<String, String>,
}

impl Message for Encode {
    type Result = Result<Vec<DownlinkRecord>, ConvertError>;
}

/// Runs a rule node's script on a message and returns its JSON result.
pub struct RunScript {
    pub script: Arc<Script>,
    pub data: String,
    pub metadata: BTreeMap<String, String>,
    pub msg_type: String,
}

impl Message for RunScript {
    type Result = Result<serde_json::Value, ConvertError>;
}

/// A converter run for the converter test page: the same runtime, script
/// environment, limits and result checks as records and downlinks get.
/// The script may be one being edited: it is compiled for this run only
/// and forgotten after it, so tests do not fill the workers' caches.
pub struct TestRun {
    pub script: Arc<Script>,
    pub input: TestInput,
}

/// What a [`TestRun`] passes to the script.
pub enum TestInput {
    /// `Decoder(payload, metadata)` with a record's bytes and metadata.
    Uplink(Arc<SourceRecord>),
    /// `Encoder(msg, metadata, msgType, integrationMetadata)`.
    Downlink {
        data: String,
        metadata: BTreeMap<String, String>,
        msg_type: String,
        integration_metadata: BTreeMap<String, String>,
    },
}

/// A test run's outcome: what the script returned (when it returned), and
/// the result as the runtime reads it, or why it was rejected.
pub struct TestOutcome {
    pub returned: Option<serde_json::Value>,
    pub result: Result<TestResult, ConvertError>,
}

pub enum TestResult {
    Uplink(Vec<Uplink>),
    Downlink(Vec<DownlinkRecord>),
}

impl Message for TestRun {
    type Result = TestOutcome;
}

/// The key test scripts are compiled under; never a script id.
const TEST_KEY: &str = "test-run";

/// A converter worker: one thread, one QuickJS runtime.
pub struct ConverterWorker {
    runtime: JsRuntime,
    /// How many entries of `RETIRED` this worker has forgotten.
    retired_seen: usize,
}

impl Actor for ConverterWorker {
    type Context = SyncContext<Self>;
}

impl ConverterWorker {
    pub fn new(limits: JsLimits) -> Result<Self, JsError> {
        Ok(ConverterWorker {
            runtime: JsRuntime::new(limits)?,
            retired_seen: 0,
        })
    }

    /// Starts `workers` threads, each with its own runtime.
    pub fn start_pool(workers: usize, limits: JsLimits) -> Addr<ConverterWorker> {
        SyncArbiter::start(workers, move || {
            ConverterWorker::new(limits).expect("a QuickJS runtime can be created")
        })
    }

    /// Calls a compiled script, with a short time limit while it is on
    /// probation.
    fn call(&mut self, script: &Script, args: &[JsArg]) -> Result<serde_json::Value, JsError> {
        let key = self.ensure_compiled(script)?;
        let timeout = script.call_timeout(self.runtime.limits().call_timeout);
        let result = self.runtime.call_within(&key, args, timeout);
        script.record_call(&result);
        result
    }

    fn ensure_compiled(&mut self, script: &Script) -> Result<String, JsError> {
        self.forget_retired();
        let key = script.id.to_string();
        if !self.runtime.is_compiled(&key) {
            let (name, params) = script.kind.signature();
            self.runtime
                .compile(&key, &script.origin, name, params, &script.body)?;
        }
        Ok(key)
    }
}

impl ConverterWorker {
    /// Drops the compiled functions of scripts no set uses any more.
    fn forget_retired(&mut self) {
        if RETIRED_COUNT.load(Ordering::Acquire) as usize == self.retired_seen {
            return;
        }
        let retired = RETIRED.lock().unwrap_or_else(|e| e.into_inner());
        for id in &retired[self.retired_seen..] {
            self.runtime.remove(&id.to_string());
        }
        self.retired_seen = retired.len();
    }
}

impl Handler<Decode> for ConverterWorker {
    type Result = MessageResult<Decode>;

    fn handle(&mut self, batch: Decode, _: &mut SyncContext<Self>) -> Self::Result {
        let results = batch
            .records
            .iter()
            .map(|record| {
                let output = self.call(
                    &batch.script,
                    &[
                        JsArg::Bytes(&record.record.payload),
                        JsArg::RecordMetadata(&record.record),
                    ],
                )?;
                Ok(uplink::parse(output)?)
            })
            .collect();
        MessageResult(results)
    }
}

impl Handler<TestRun> for ConverterWorker {
    type Result = MessageResult<TestRun>;

    fn handle(&mut self, run: TestRun, _: &mut SyncContext<Self>) -> Self::Result {
        let (name, params) = run.script.kind.signature();
        if let Err(e) =
            self.runtime
                .compile(TEST_KEY, &run.script.origin, name, params, &run.script.body)
        {
            return MessageResult(TestOutcome {
                returned: None,
                result: Err(e.into()),
            });
        }
        let output = match &run.input {
            TestInput::Uplink(record) => self.runtime.call(
                TEST_KEY,
                &[JsArg::Bytes(&record.payload), JsArg::RecordMetadata(record)],
            ),
            TestInput::Downlink {
                data,
                metadata,
                msg_type,
                integration_metadata,
            } => {
                let data = script_data(data);
                self.runtime.call(
                    TEST_KEY,
                    &[
                        JsArg::Json(&data),
                        JsArg::StringMap(metadata),
                        JsArg::Str(msg_type),
                        JsArg::StringMap(integration_metadata),
                    ],
                )
            }
        };
        self.runtime.remove(TEST_KEY);
        let outcome = match output {
            Err(e) => TestOutcome {
                returned: None,
                result: Err(e.into()),
            },
            Ok(value) => {
                let result = match &run.input {
                    TestInput::Uplink(_) => uplink::parse(value.clone())
                        .map(TestResult::Uplink)
                        .map_err(ConvertError::from),
                    TestInput::Downlink { .. } => downlink::parse(value.clone())
                        .map(TestResult::Downlink)
                        .map_err(ConvertError::from),
                };
                TestOutcome {
                    returned: Some(value),
                    result,
                }
            }
        };
        MessageResult(outcome)
    }
}

/// Message data as the JSON a script's `msg` is parsed from: the data
/// itself when it is JSON, else the data as a JSON string.
fn script_data(data: &str) -> String {
    if serde_json::from_str::<serde_json::Value>(data).is_ok() {
        data.to_string()
    } else {
        serde_json::Value::String(data.to_string()).to_string()
    }
}

impl Handler<Encode> for ConverterWorker {
    type Result = MessageResult<Encode>;

    fn handle(&mut self, job: Encode, _: &mut SyncContext<Self>) -> Self::Result {
        let result = (|| {
            let data = script_data(&job.data);
            let output = self.call(
                &job.script,
                &[
                    JsArg::Json(&data),
                    JsArg::StringMap(&job.metadata),
                    JsArg::Str(&job.msg_type),
                    JsArg::StringMap(&job.integration_metadata),
                ],
            )?;
            Ok(downlink::parse(output)?)
        })();
        MessageResult(result)
    }
}

impl Handler<RunScript> for ConverterWorker {
    type Result = MessageResult<RunScript>;

    fn handle(&mut self, job: RunScript, _: &mut SyncContext<Self>) -> Self::Result {
        let result = (|| {
            let data = script_data(&job.data);
            Ok(self.call(
                &job.script,
                &[
                    JsArg::Json(&data),
                    JsArg::StringMap(&job.metadata),
                    JsArg::Str(&job.msg_type),
                ],
            )?)
        })();
        MessageResult(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_script_on_probation_fails_fast_where_it_hangs_and_runs_where_it_does_not() {
        actix::System::new().block_on(async {
            let pool = ConverterWorker::start_pool(
                1,
                JsLimits {
                    call_timeout: Duration::from_millis(500),
                    memory_limit_bytes: 16 << 20,
                    max_result_bytes: 1 << 20,
                },
            );
            // Hangs on records whose first byte is 'h'.
            let script = Script::new(
                ScriptKind::Decoder,
                "picky.js",
                "if (payload[0] === 104) { while (true) {} } return {deviceName: 'd', telemetry: {t: 1}};",
            );
            let record = |text: &'static str| DecodeInput {
                record: Arc::new(SourceRecord {
                    payload: bytes::Bytes::from_static(text.as_bytes()),
                    ..Default::default()
                }),
            };
            let decode = |inputs: Vec<DecodeInput>| {
                pool.send(Decode {
                    script: script.clone(),
                    records: inputs,
                })
            };
            // Three hangs at the full limit put it on probation; the
            // next hangs are stopped after 50 ms.
            let started = Instant::now();
            let results = decode((0..10).map(|_| record("h")).collect()).await.unwrap();
            assert!(results.iter().all(Result::is_err));
            let elapsed = started.elapsed();
            assert!(
                elapsed < Duration::from_millis(3 * 500 + 7 * 400),
                "{elapsed:?}"
            );
            let last = results[9].as_ref().unwrap_err().to_string();
            assert!(last.contains("50ms"), "{last}");
            // A record it handles ends in time and takes it off probation;
            // good records between hangs are never dead letters.
            let mixed = decode(vec![record("h"), record("g"), record("g"), record("h"), record("g")])
                .await
                .unwrap();
            let ok: Vec<bool> = mixed.iter().map(Result::is_ok).collect();
            assert_eq!(ok, [false, true, true, false, true]);
            let full = mixed[3].as_ref().unwrap_err().to_string();
            assert!(full.contains("500ms"), "off probation again: {full}");
        });
    }
}
