//! The downlink producer actor: puts downlink records on Kinesis with
//! PutRecords. The rule chain sees it as a [`DownlinkSender`]; a send is
//! answered once every record of it was accepted, or with the reason it
//! never will be.
//!
//! Records from all sends are queued per (stream, partition key) and
//! batched within PutRecords' documented limits: at most 500 records and
//! 5 MiB (data and partition keys) per request. A record above 5 MiB, which
//! only a stream with a larger maximum record size accepts, goes alone.
//! Each record must fit the stream's own maximum record size (data plus
//! partition key), read from DescribeStreamSummary the first time the
//! producer sends to a stream (1 MiB when the answer does not carry it or
//! cannot be had); partition keys have 1 to 256 characters; an explicit
//! hash key is passed through and must be a decimal in 0..2^128-1. A record
//! that breaks these rules is never sent: its send fails at once.
//!
//! Order: a partition key has at most one record in flight, so a record
//! never overtakes an earlier one with the same key, also when that one is
//! rejected and retried. Only the entries Kinesis rejects are retried, with
//! exponential backoff and jitter, up to [`MAX_ATTEMPTS`] times; then the
//! send fails. Errors that no retry can cure (a missing stream, denied
//! access, a refused request) fail the sends at once.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use actix::prelude::*;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use futures::future::BoxFuture;
use rand::Rng;
use tokio::sync::oneshot;

use super::consumer::describe;
use crate::chain::DownlinkSender;
use crate::convert::DownlinkRecord;

/// Most records in one PutRecords request.
pub const MAX_BATCH_RECORDS: usize = 500;
/// Most bytes (data and partition keys) in one PutRecords request.
pub const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;
/// A record's limit (data and partition key) when the stream does not say.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Longest partition key, in characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;
/// Attempts per record before its send fails.
pub const MAX_ATTEMPTS: u32 = 15;
/// PutRecords requests under way at once.
const MAX_REQUESTS: usize = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Puts records; answers once all were accepted, or with the reason.
pub struct Put(pub Vec<DownlinkRecord>);

impl Message for Put {
    type Result = Result<(), String>;
}

type Key = (String, String);

/// A PutRecords answer: per entry, its error code and message if rejected;
/// or the error of the whole request.
type Answer = Result<Vec<Option<(String, String)>>, (String, String)>;

struct Entry {
    put: u64,
    record: DownlinkRecord,
    attempts: u32,
}

impl Entry {
    fn size(&self) -> usize {
        self.record.data.len() + self.record.partition_key.len()
    }
}

/// The records of one partition key, oldest first. `busy` while its first
/// record is in flight or waiting to be retried.
#[derive(Default)]
struct KeyQueue {
    entries: VecDeque<Entry>,
    busy: bool,
}

struct Outgoing {
    records: Vec<DownlinkRecord>,
    reply: oneshot::Sender<Result<(), String>>,
}

struct PutState {
    remaining: usize,
    reply: Option<oneshot::Sender<Result<(), String>>>,
}

/// A stream's maximum record size: known, or being read.
enum Limit {
    Known(usize),
    Reading,
}

pub struct DownlinkProducer {
    integration: String,
    client: Client,
    io: tokio::runtime::Handle,
    limits: HashMap<String, Limit>,
    /// Sends waiting for their streams' limits, in arrival order.
    intake: VecDeque<Outgoing>,
    keys: HashMap<Key, KeyQueue>,
    /// Keys whose first record can be sent, roughly oldest first.
    ready: VecDeque<Key>,
    puts: HashMap<u64, PutState>,
    next_put: u64,
    requests: usize,
}

impl Actor for DownlinkProducer {
    type Context = Context<Self>;
}

impl DownlinkProducer {
    pub fn new(integration: String, client: Client, io: tokio::runtime::Handle) -> Self {
        DownlinkProducer {
            integration,
            client,
            io,
            limits: HashMap::new(),
            intake: VecDeque::new(),
            keys: HashMap::new(),
            ready: VecDeque::new(),
            puts: HashMap::new(),
            next_put: 0,
            requests: 0,
        }
    }

    /// Moves sends from the intake to the key queues, in arrival order,
    /// as far as their streams' limits are known.
    fn take_in(&mut self, ctx: &mut Context<Self>) {
        while let Some(send) = self.intake.front() {
            let unknown: Vec<String> = send
                .records
                .iter()
                .map(|r| r.stream_name.clone())
                .filter(|s| !matches!(self.limits.get(s), Some(Limit::Known(_))))
                .collect();
            if let Some(stream) = unknown.into_iter().next() {
                if !self.limits.contains_key(&stream) {
                    self.read_limit(stream, ctx);
                }
                return;
            }
            let send = self.intake.pop_front().expect("front exists");
            self.accept(send);
        }
        self.send_batches(ctx);
    }

    fn read_limit(&mut self, stream: String, ctx: &mut Context<Self>) {
        self.limits.insert(stream.clone(), Limit::Reading);
        let request = self.client.describe_stream_summary().stream_name(&stream);
        let task = self
            .io
            .spawn(async move { request.send().await.map_err(|e| describe(&e)) });
        let integration = self.integration.clone();
        ctx.spawn(task.into_actor(self).map(move |answer, producer, ctx| {
            let limit = match answer {
                Ok(Ok(output)) => output
                    .stream_description_summary()
                    .and_then(|s| s.max_record_size_in_kib())
                    .map(|kib| kib.max(1) as usize * 1024)
                    .unwrap_or(DEFAULT_MAX_RECORD_BYTES),
                Ok(Err((code, message))) => {
                    tracing::warn!(integration = %integration, stream = %stream,
                        error = %format!("{code}: {message}"),
                        "cannot read the downlink stream's maximum record size; assuming 1 MiB");
                    DEFAULT_MAX_RECORD_BYTES
                }
                Err(e) => {
                    tracing::warn!(integration = %integration, stream = %stream, error = %e,
                        "cannot read the downlink stream's maximum record size; assuming 1 MiB");
                    DEFAULT_MAX_RECORD_BYTES
                }
            };
            tracing::debug!(integration = %integration, stream = %stream, max_record_bytes = limit,
                "downlink stream limits read");
            producer.limits.insert(stream, Limit::Known(limit));
            producer.take_in(ctx);
        }));
    }

    /// Checks a send's records and queues them, or fails it.
    fn accept(&mut self, send: Outgoing) {
        if let Err(reason) = self.check(&send.records) {
            tracing::error!(integration = %self.integration, error = %reason,
                "downlink not sent: it can never be accepted by Kinesis");
            let _ = send.reply.send(Err(reason));
            return;
        }
        if send.records.is_empty() {
            let _ = send.reply.send(Ok(()));
            return;
        }
        let put = self.next_put;
        self.next_put += 1;
        self.puts.insert(
            put,
            PutState {
                remaining: send.records.len(),
                reply: Some(send.reply),
            },
        );
        for record in send.records {
            let key = (record.stream_name.clone(), record.partition_key.clone());
            let queue = self.keys.entry(key.clone()).or_default();
            if queue.entries.is_empty() && !queue.busy {
                self.ready.push_back(key);
            }
            queue.entries.push_back(Entry {
                put,
                record,
                attempts: 0,
            });
        }
    }

    fn check(&self, records: &[DownlinkRecord]) -> Result<(), String> {
        for record in records {
            let stream = &record.stream_name;
            let max = match self.limits.get(stream) {
                Some(Limit::Known(max)) => *max,
                _ => DEFAULT_MAX_RECORD_BYTES,
            };
            check_record(record, max)
                .map_err(|reason| format!("record for stream {stream:?}: {reason}"))?;
        }
        Ok(())
    }

    /// Starts PutRecords requests while there is room and something to send.
    fn send_batches(&mut self, ctx: &mut Context<Self>) {
        while self.requests < MAX_REQUESTS {
            let Some((stream, entries)) = self.next_batch() else {
                return;
            };
            self.requests += 1;
            self.send_batch(stream, entries, ctx);
        }
    }

    /// The next batch: the first record of each ready key of one stream,
    /// within the request limits.
    fn next_batch(&mut self) -> Option<(String, Vec<Entry>)> {
        let mut stream: Option<String> = None;
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut aside = Vec::new();
        while let Some(key) = self.ready.pop_front() {
            if stream.as_ref().is_some_and(|s| *s != key.0) {
                aside.push(key);
                continue;
            }
            let Some(queue) = self.keys.get_mut(&key) else {
                continue;
            };
            if queue.busy {
                // Put back by its release.
                continue;
            }
            // Records of sends that failed already are not sent.
            while queue
                .entries
                .front()
                .is_some_and(|e| !self.puts.contains_key(&e.put))
            {
                queue.entries.pop_front();
            }
            let Some(size) = queue.entries.front().map(Entry::size) else {
                self.keys.remove(&key);
                continue;
            };
            if !batch.is_empty() && bytes + size > MAX_BATCH_BYTES {
                aside.push(key);
                break;
            }
            let entry = queue.entries.pop_front().expect("front exists");
            queue.busy = true;
            bytes += size;
            stream.get_or_insert_with(|| key.0.clone());
            batch.push(entry);
            if batch.len() == MAX_BATCH_RECORDS {
                break;
            }
        }
        // Keys set aside keep their place at the front.
        for key in aside.into_iter().rev() {
            self.ready.push_front(key);
        }
        stream.map(|s| (s, batch))
    }

    fn send_batch(&mut self, stream: String, entries: Vec<Entry>, ctx: &mut Context<Self>) {
        let request_entries: Vec<PutRecordsRequestEntry> = entries
            .iter()
            .filter_map(|e| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(e.record.data.clone()))
                    .partition_key(&e.record.partition_key)
                    .set_explicit_hash_key(e.record.explicit_hash_key.clone())
                    .build()
                    .ok()
            })
            .collect();
        let request = self
            .client
            .put_records()
            .stream_name(&stream)
            .set_records(Some(request_entries));
        let task = self.io.spawn(async move {
            let output = request.send().await.map_err(|e| describe(&e))?;
            Ok::<_, (String, String)>(
                output
                    .records()
                    .iter()
                    .map(|r| {
                        r.error_code().map(|code| {
                            (
                                code.to_string(),
                                r.error_message().unwrap_or("").to_string(),
                            )
                        })
                    })
                    .collect::<Vec<_>>(),
            )
        });
        ctx.spawn(
            async move {
                task.await
                    .unwrap_or_else(|e| Err(("TaskFailed".into(), e.to_string())))
            }
            .into_actor(self)
            .map(move |answer, producer, ctx| {
                producer.requests -= 1;
                producer.answered(stream, entries, answer, ctx);
                producer.send_batches(ctx);
            }),
        );
    }

    /// Applies a PutRecords answer: accepted entries are done, rejected
    /// ones wait and are retried, and sends that can never succeed fail.
    fn answered(
        &mut self,
        stream: String,
        entries: Vec<Entry>,
        answer: Answer,
        ctx: &mut Context<Self>,
    ) {
        let results: Vec<Option<(String, String)>> = match answer {
            Ok(results) if results.len() == entries.len() => results,
            Ok(results) => {
                let error = (
                    "BadResponse".to_string(),
                    format!("{} results for {} records", results.len(), entries.len()),
                );
                vec![Some(error); entries.len()]
            }
            Err(error) => vec![Some(error); entries.len()],
        };
        let mut rejected = 0;
        let mut last_error = String::new();
        let mut longest_wait = Duration::ZERO;
        for (mut entry, result) in entries.into_iter().zip(results) {
            let key = (stream.clone(), entry.record.partition_key.clone());
            let Some((code, message)) = result else {
                self.entry_done(entry.put);
                self.release(key);
                continue;
            };
            entry.attempts += 1;
            let error = format!("{code}: {message}");
            if !retryable(&code) || entry.attempts >= MAX_ATTEMPTS {
                let why = if retryable(&code) {
                    format!("PutRecords to stream {stream:?} failed {MAX_ATTEMPTS} times: {error}")
                } else {
                    format!("PutRecords to stream {stream:?} failed: {error}")
                };
                tracing::error!(integration = %self.integration, stream = %stream,
                    partition_key = %entry.record.partition_key, error = %why, "downlink not sent");
                self.fail_put(entry.put, why);
                self.release(key);
                continue;
            }
            rejected += 1;
            last_error = error;
            let wait = backoff(entry.attempts);
            longest_wait = longest_wait.max(wait);
            // Back at the front of its key; the key stays busy until then.
            if let Some(queue) = self.keys.get_mut(&key) {
                queue.entries.push_front(entry);
            }
            ctx.run_later(wait, move |producer, ctx| {
                producer.release(key);
                producer.send_batches(ctx);
            });
        }
        if rejected > 0 {
            tracing::warn!(integration = %self.integration, stream = %stream, rejected,
                error = %last_error, retry_in_ms = longest_wait.as_millis() as u64,
                "PutRecords entries rejected; retrying them");
        }
    }

    /// The key's first record is no longer in flight: the next may go.
    fn release(&mut self, key: Key) {
        let Some(queue) = self.keys.get_mut(&key) else {
            return;
        };
        queue.busy = false;
        if queue.entries.is_empty() {
            self.keys.remove(&key);
        } else {
            self.ready.push_back(key);
        }
    }

    fn entry_done(&mut self, put: u64) {
        let Some(state) = self.puts.get_mut(&put) else {
            return;
        };
        state.remaining -= 1;
        if state.remaining == 0 {
            if let Some(reply) = self.puts.remove(&put).and_then(|s| s.reply) {
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// Fails a send; its records not sent yet are dropped.
    fn fail_put(&mut self, put: u64, reason: String) {
        if let Some(reply) = self.puts.remove(&put).and_then(|s| s.reply) {
            let _ = reply.send(Err(reason));
        }
    }
}

/// Whether a record may be sent to a stream that takes records of up to
/// `max_record_bytes` (data and partition key).
pub fn check_record(record: &DownlinkRecord, max_record_bytes: usize) -> Result<(), String> {
    let chars = record.partition_key.chars().count();
    if !(1..=MAX_PARTITION_KEY_CHARS).contains(&chars) {
        return Err(format!(
            "the partition key has {chars} characters (1 to {MAX_PARTITION_KEY_CHARS} allowed)"
        ));
    }
    if let Some(key) = &record.explicit_hash_key {
        if super::kpl::parse_hash_key(key).is_none() {
            return Err(format!(
                "the explicit hash key {key:?} is not a decimal number in 0..2^128-1"
            ));
        }
    }
    let size = record.data.len() + record.partition_key.len();
    if size > max_record_bytes {
        return Err(format!(
            "data and partition key are {size} bytes; the stream takes at most {max_record_bytes}"
        ));
    }
    Ok(())
}

/// Whether another attempt may succeed.
fn retryable(code: &str) -> bool {
    !matches!(
        code,
        "ResourceNotFoundException"
            | "AccessDeniedException"
            | "ValidationException"
            | "InvalidArgumentException"
            | "KMSAccessDeniedException"
            | "KMSDisabledException"
            | "KMSInvalidStateException"
            | "KMSNotFoundException"
            | "KMSOptInRequired"
            | "BadRequest"
    )
}

/// Exponential backoff with jitter: half to all of 100 ms doubled per
/// attempt, up to 5 s.
fn backoff(attempt: u32) -> Duration {
    let full = FIRST_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let millis = full.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
}

impl Handler<Put> for DownlinkProducer {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(&mut self, Put(records): Put, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.intake.push_back(Outgoing { records, reply });
        self.take_in(ctx);
        Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|_| Err("the downlink producer stopped".into()))
        })
    }
}

/// The producer as the rule chain's downlink sender.
pub struct ProducerSender(pub Addr<DownlinkProducer>);

impl DownlinkSender for ProducerSender {
    fn send(&self, records: Vec<DownlinkRecord>) -> BoxFuture<'static, Result<(), String>> {
        let addr = self.0.clone();
        Box::pin(async move {
            addr.send(Put(records))
                .await
                .map_err(|e| format!("downlink producer unavailable: {e}"))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, hash: Option<&str>, size: usize) -> DownlinkRecord {
        DownlinkRecord {
            stream_name: "s".into(),
            partition_key: key.into(),
            explicit_hash_key: hash.map(str::to_string),
            data: vec![0; size],
        }
    }

    #[test]
    fn records_that_can_never_be_sent_are_refused() {
        assert!(check_record(&record("k", None, 10), 1024).is_ok());
        assert!(check_record(&record("", None, 10), 1024).is_err());
        assert!(check_record(&record(&"é".repeat(256), None, 10), 2048).is_ok());
        assert!(check_record(&record(&"k".repeat(257), None, 10), 2048).is_err());
        assert!(check_record(
            &record("k", Some("340282366920938463463374607431768211455"), 1),
            1024
        )
        .is_ok());
        assert!(check_record(
            &record("k", Some("340282366920938463463374607431768211456"), 1),
            1024
        )
        .is_err());
        assert!(check_record(&record("k", Some("12a"), 1), 1024).is_err());
        assert!(check_record(&record("k", Some("-1"), 1), 1024).is_err());
        // Data and key together.
        assert!(check_record(&record("kk", None, 1022), 1024).is_ok());
        assert!(check_record(&record("kk", None, 1023), 1024).is_err());
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_a_cap() {
        for attempt in 1..30 {
            let wait = backoff(attempt);
            let full = FIRST_BACKOFF
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(MAX_BACKOFF);
            assert!(wait >= full / 2 && wait <= full, "{attempt}: {wait:?}");
        }
    }
}
