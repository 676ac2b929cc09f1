//! The shard consumer actor: reads one shard with GetRecords, hands the
//! records to the uplink converter and the rule chain in order, and moves
//! the shard's checkpoint as records are done.
//!
//! Reading honours Kinesis' limit of five GetRecords calls per second per
//! shard (one call per 200 ms), waits up to about a second between calls
//! only when caught up (an empty read with MillisBehindLatest 0), and backs
//! off with jitter on throttling. The in-flight window bounds the records
//! and bytes fetched but not done: no fetch happens while it is full.
//! Records of the shard are decoded in batches; batches may finish on
//! different converter workers in any order, but enter the chain in
//! sequence order.
//!
//! KPL aggregated records are taken apart here: each user record is a
//! record of its own for the converter, the chain and the window, under its
//! Kinesis record's sequence number and its own sub-sequence number, so a
//! checkpoint can fall inside an aggregate. User records whose hash key
//! lies outside the shard's range are dropped and counted, as the KCL does.
//!
//! With enhanced fan-out the reader pushes records; the consumer asks it to
//! wait for them ([`ShardReader::wait_ready`]) only while its window and
//! the shared budget have room, so a full window stops the subscription
//! from being read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use aws_sdk_kinesis::error::ProvideErrorMetadata;
use rand::Rng;

use super::kpl;
use super::reader::{Fetched, Position, RawRecord, ReadError, ShardReader};
use super::window::{Done, SubRecord, Window};
use super::Integration;
use crate::chain::RuleSet;
use crate::convert::{ConvertError, Decode, DecodeInput, Uplink};
use crate::delivery::{CompletionSink, SourceRecord, Ticket};
use crate::status::ShardState;
use crate::store::Write;

/// Most records in one decode job.
const DECODE_CHUNK: usize = 256;
/// Longest wait between calls when caught up.
const MAX_IDLE_WAIT: Duration = Duration::from_millis(1000);
/// Shortest such wait, for sources without a call limit.
const MIN_IDLE_WAIT: Duration = Duration::from_millis(10);
/// Longest backoff after errors.
const MAX_BACKOFF: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Getting a shard iterator.
    Positioning,
    /// Ready to call GetRecords when allowed.
    Idle,
    /// Waiting for a pushing reader to have records.
    Waiting,
    /// A GetRecords call is under way.
    Fetching,
    /// The window is full; waiting for records to be done.
    Blocked,
    /// SHARD_END was read; waiting for the last records to be done.
    Ended,
    /// Stopped: shutting down, or an error a person must look at.
    Stopped,
}

pub struct ShardConsumer {
    integration: Arc<Integration>,
    shard_id: String,
    /// Integration, stream and shard names, shared by all its records.
    origin: (Arc<str>, Arc<str>, Arc<str>),
    phase: Phase,
    iterator: Option<String>,
    start: Position,
    last_fetched: Option<String>,
    window: Window,
    sink: Option<Arc<ShardSink>>,
    next_call_at: Instant,
    idle_wait: Duration,
    backoff: Duration,
    batches_sent: u64,
    next_batch: u64,
    converted: BTreeMap<u64, ConvertedBatch>,
    /// Version of the rule set of the records last handed to the chain.
    forwarded_version: u64,
    written_checkpoint: Option<Done>,
    drain_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    poll_scheduled: bool,
    /// Budget reserved for the GetRecords call under way.
    reserved: usize,
    /// A pushing reader has records ready (see [`ShardReader::wait_ready`]).
    records_ready: bool,
    /// After a restart inside an aggregate: its sequence number and the
    /// last user record already done, skipped when it is read again.
    skip_through: Option<(String, u64)>,
    /// The shard's hash key range, for user records of aggregates.
    hash_range: Option<(u128, u128)>,
    /// Set until the first read after a stored checkpoint: whether that
    /// checkpoint is older than the stream's retention.
    gap_check: Option<GapCheck>,
    /// The stream was created again: the shard starts afresh once no call
    /// is under way and its records in flight are done.
    restart_pending: bool,
    /// Bounds the ERROR lines of failed records.
    failure_log: std::cell::RefCell<crate::log_budget::LogBudget>,
}

/// Where a consumer starts.
#[derive(Debug, Clone)]
pub struct Start {
    /// The shard's stored checkpoint (with a sequence number), if any.
    pub checkpoint: Option<crate::store::Checkpoint>,
    /// Where a shard without checkpoint starts.
    pub initial: crate::config::InitialPosition,
    pub hash_range: Option<(u128, u128)>,
    /// The stream's retention period, when known.
    pub retention_ms: Option<i64>,
    /// Where in the call interval (0 to 1) the shard makes its calls.
    pub phase: f64,
}

/// A stored checkpoint to compare with the stream's retention.
#[derive(Debug, Clone, Copy)]
struct GapCheck {
    /// When the checkpoint's record arrived (or, for checkpoints stored
    /// without that time, when the checkpoint was written).
    checkpoint_ms: i64,
    retention_ms: i64,
}

impl GapCheck {
    /// The oldest arrival time records can still have.
    fn trim_horizon_ms(&self) -> i64 {
        crate::msg::now_millis() - self.retention_ms
    }

    fn expired(&self) -> bool {
        self.checkpoint_ms < self.trim_horizon_ms()
    }
}

/// A record about to enter the window, with its share of its Kinesis
/// record's bytes and budget reservation.
struct Pending {
    record: SourceRecord,
    payload_share: usize,
    budget_records: usize,
}

struct ConvertedBatch {
    /// The rule set the batch was decoded with and enters the chain with.
    set: Arc<RuleSet>,
    records: Vec<(u64, Arc<SourceRecord>)>,
    results: Vec<Result<Vec<Uplink>, ConvertError>>,
}

impl ShardConsumer {
    /// A consumer that starts after its checkpoint, or else at its
    /// initial position.
    pub fn new(integration: Arc<Integration>, shard_id: String, from: Start) -> Self {
        let stored = from
            .checkpoint
            .as_ref()
            .and_then(|c| Some((c.sequence_number.clone()?, c)));
        let start = match &stored {
            Some((sequence, c)) if c.sub_sequence_number.is_some() => {
                Position::At(sequence.clone())
            }
            Some((sequence, _)) => Position::After(sequence.clone()),
            None => Position::Initial(from.initial),
        };
        let skip_through = stored
            .as_ref()
            .and_then(|(sequence, c)| Some((sequence.clone(), c.sub_sequence_number?)));
        let gap_check = match (&stored, from.retention_ms) {
            (Some((_, c)), Some(retention_ms)) => Some(GapCheck {
                checkpoint_ms: c.arrival_ms.unwrap_or(c.updated_ms),
                retention_ms,
            }),
            _ => None,
        };
        let checkpoint = stored.map(|(sequence_number, c)| Done {
            sequence_number,
            sub_sequence_number: c.sub_sequence_number,
            arrival_ms: c.arrival_ms.unwrap_or(c.updated_ms),
        });
        let origin = (
            Arc::from(integration.config.name.as_str()),
            Arc::from(integration.config.stream_name.as_str()),
            Arc::from(shard_id.as_str()),
        );
        // Shards make their calls at different points of the call
        // interval, so that their fetches (and the shared budget they take)
        // spread over it instead of arriving together.
        let phase = integration
            .reader
            .call_interval()
            .mul_f64(from.phase.clamp(0.0, 1.0));
        ShardConsumer {
            integration,
            shard_id,
            origin,
            phase: Phase::Positioning,
            iterator: None,
            start,
            last_fetched: None,
            window: Window::new(),
            sink: None,
            next_call_at: Instant::now() + phase,
            idle_wait: Duration::ZERO,
            backoff: Duration::ZERO,
            batches_sent: 0,
            next_batch: 0,
            converted: BTreeMap::new(),
            forwarded_version: 0,
            written_checkpoint: checkpoint,
            drain_waiters: Vec::new(),
            poll_scheduled: false,
            reserved: 0,
            records_ready: false,
            skip_through,
            hash_range: from.hash_range,
            gap_check,
            restart_pending: false,
            failure_log: Default::default(),
        }
    }

    fn reader(&self) -> &dyn ShardReader {
        self.integration.reader.as_ref()
    }

    fn name(&self) -> &str {
        &self.integration.config.name
    }

    fn stream(&self) -> &str {
        &self.integration.config.stream_name
    }

    fn set_state(&self, state: ShardState, error: Option<String>) {
        let in_flight = self.window.records();
        let checkpoint = self.written_checkpoint.as_ref().map(Done::to_string);
        self.integration
            .status
            .update(self.name(), &self.shard_id, |s| {
                s.state = state;
                s.in_flight = in_flight;
                if s.checkpoint != checkpoint {
                    s.checkpoint_ms = Some(crate::msg::now_millis());
                }
                s.checkpoint = checkpoint;
                if error.is_some() {
                    s.last_error = error;
                }
            });
    }

    /// Gets a shard iterator at the current position.
    fn position(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Positioning;
        let position = match &self.last_fetched {
            Some(sequence) => Position::After(sequence.clone()),
            None => self.start.clone(),
        };
        let call = self
            .integration
            .reader
            .iterator(self.stream(), &self.shard_id, &position);
        ctx.spawn(
            call.into_actor(self)
                .map(|result, consumer, ctx| consumer.positioned(result, ctx)),
        );
    }

    fn positioned(
        &mut self,
        result: Result<Option<String>, (String, String)>,
        ctx: &mut Context<Self>,
    ) {
        if self.phase == Phase::Stopped {
            return;
        }
        if self.restart_pending {
            return self.restart_when_drained(ctx);
        }
        match result {
            Ok(Some(iterator)) => {
                self.iterator = Some(iterator);
                self.phase = Phase::Idle;
                self.backoff = Duration::ZERO;
                self.set_state(ShardState::Reading, None);
                ctx.notify(Poll);
            }
            Ok(None) => self.reached_shard_end(ctx),
            Err((code, message))
                if code == "InvalidArgumentException"
                    && self.last_fetched.is_none()
                    && matches!(self.start, Position::After(_) | Position::At(_)) =>
            {
                if let Some(check) = self.gap_check.take().filter(GapCheck::expired) {
                    // Refused because the records after it have expired.
                    let horizon = check.trim_horizon_ms();
                    tracing::error!(
                        integration = %self.name(), stream = %self.stream(), shard = %self.shard_id,
                        checkpoint = ?self.start, error = %message,
                        checkpoint_arrival_ms = check.checkpoint_ms, trim_horizon_ms = horizon,
                        gap_ms = horizon - check.checkpoint_ms,
                        "the checkpoint is older than the stream's retention period: records put after it until the trim horizon may have expired unread; reading the shard from TRIM_HORIZON"
                    );
                } else {
                    // The checkpoint's sequence number is not of this stream:
                    // it was deleted and created again under the same name.
                    // Read the new stream from its start rather than never.
                    tracing::warn!(
                        integration = %self.name(), stream = %self.stream(), shard = %self.shard_id,
                        checkpoint = ?self.start, error = %message,
                        "the checkpoint does not belong to this stream (re-created?); reading the shard from TRIM_HORIZON"
                    );
                }
                self.start = Position::Initial(crate::config::InitialPosition::TrimHorizon);
                self.skip_through = None;
                self.position(ctx);
            }
            Err((code, message))
                if code == "InvalidArgumentException" && self.last_fetched.is_some() =>
            {
                // The shard refuses the sequence number of its own last
                // record: the stream was deleted and created again under
                // the same name while it was read.
                tracing::warn!(
                    integration = %self.name(), stream = %self.stream(), shard = %self.shard_id,
                    last_read = ?self.last_fetched, error = %message,
                    "the shard refuses its own last sequence number: the stream was deleted and created again; its new shard is read from TRIM_HORIZON once the records in flight are done"
                );
                self.set_state(
                    ShardState::Retrying,
                    Some(format!("stream created again: {code}: {message}")),
                );
                self.restart_pending = true;
                self.restart_when_drained(ctx);
            }
            Err((code, message)) => {
                let wait = self.next_backoff(&code);
                tracing::warn!(
                    integration = %self.name(), stream = %self.stream(), shard = %self.shard_id,
                    error = %format!("{code}: {message}"), retry_in_ms = wait.as_millis() as u64,
                    "cannot get a shard iterator; retrying"
                );
                self.set_state(ShardState::Retrying, Some(format!("{code}: {message}")));
                ctx.run_later(wait, |consumer, ctx| consumer.position(ctx));
            }
        }
    }

    /// Starts the shard afresh at TRIM_HORIZON (its stream was created
    /// again) once every record of the old one in flight is done; fetches
    /// nothing meanwhile.
    fn restart_when_drained(&mut self, ctx: &mut Context<Self>) {
        if self.phase == Phase::Stopped {
            return;
        }
        // No call is under way here: it was answered, or none was made.
        self.phase = Phase::Positioning;
        if !self.window.is_empty() || !self.converted.is_empty() {
            ctx.run_later(Duration::from_millis(100), |consumer, ctx| {
                consumer.restart_when_drained(ctx)
            });
            return;
        }
        self.window = Window::new();
        self.iterator = None;
        self.last_fetched = None;
        self.skip_through = None;
        self.gap_check = None;
        self.written_checkpoint = None;
        self.restart_pending = false;
        self.start = Position::Initial(crate::config::InitialPosition::TrimHorizon);
        self.position(ctx);
    }

    fn next_backoff(&mut self, code: &str) -> Duration {
        let base = if code == "ResourceNotFoundException" {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(500)
        };
        self.backoff = (self.backoff * 2).clamp(base, MAX_BACKOFF);
        let jitter = rand::rng().random_range(0..=self.backoff.as_millis() as u64 / 2);
        self.backoff + Duration::from_millis(jitter)
    }

    fn window_full(&self) -> bool {
        let pipeline = &self.integration.pipeline;
        self.window.records() >= pipeline.max_in_flight_records
            || self.window.bytes() >= pipeline.max_in_flight_bytes
    }

    /// Records this shard's own window has room for.
    fn room(&self) -> usize {
        self.integration
            .pipeline
            .max_in_flight_records
            .saturating_sub(self.window.records())
    }

    fn poll(&mut self, ctx: &mut Context<Self>) {
        if self.phase != Phase::Idle && self.phase != Phase::Blocked || self.restart_pending {
            return;
        }
        if self.window_full() {
            self.phase = Phase::Blocked;
            return;
        }
        if !self.integration.budget.has_room() {
            // The shared budget is full: other shards hold it, so no record
            // of ours may wake us; look again shortly.
            self.phase = Phase::Blocked;
            return self.poll_again_soon(ctx);
        }
        self.phase = Phase::Idle;
        let now = Instant::now();
        if self.next_call_at > now {
            if !self.poll_scheduled {
                self.poll_scheduled = true;
                ctx.run_later(self.next_call_at - now, |consumer, ctx| {
                    consumer.poll_scheduled = false;
                    consumer.poll(ctx);
                });
            }
            return;
        }
        let Some(iterator) = self.iterator.clone() else {
            return;
        };
        if self.reader().pushes() && !self.records_ready {
            // Nothing is taken from a push stream until there is room.
            self.phase = Phase::Waiting;
            let wait = self.reader().wait_ready(&iterator);
            ctx.spawn(
                wait.into_actor(self)
                    .map(|result, consumer, ctx| consumer.waited(result, ctx)),
            );
            return;
        }
        let wanted = (self.integration.config.max_records as usize).min(self.room());
        let reserved = self.integration.budget.reserve(wanted);
        if reserved == 0 {
            // Another shard took the last of the budget meanwhile.
            self.phase = Phase::Blocked;
            return self.poll_again_soon(ctx);
        }
        self.reserved = reserved;
        self.phase = Phase::Fetching;
        self.next_call_at = now + self.integration.reader.call_interval();
        let call = self.integration.reader.records(iterator, reserved as i32);
        ctx.spawn(
            call.into_actor(self)
                .map(|result, consumer, ctx| consumer.fetched(result, ctx)),
        );
    }

    fn waited(&mut self, result: Result<(), ReadError>, ctx: &mut Context<Self>) {
        if self.phase != Phase::Waiting {
            return;
        }
        if self.restart_pending {
            return self.restart_when_drained(ctx);
        }
        match result {
            Ok(()) => {
                self.records_ready = true;
                self.phase = Phase::Idle;
                self.poll(ctx);
            }
            Err((code, message)) => self.fetch_failed(code, message, ctx),
        }
    }

    /// One timer at a time.
    fn poll_again_soon(&mut self, ctx: &mut Context<Self>) {
        if !self.poll_scheduled {
            self.poll_scheduled = true;
            ctx.run_later(Duration::from_millis(20), |consumer, ctx| {
                consumer.poll_scheduled = false;
                consumer.poll(ctx);
            });
        }
    }

    fn fetched(&mut self, result: Result<Fetched, ReadError>, ctx: &mut Context<Self>) {
        // The reservation covers the records fetched; the rest goes back.
        let used = result.as_ref().map(|f| f.records.len()).unwrap_or(0);
        let reserved = std::mem::take(&mut self.reserved);
        if reserved > used {
            self.integration.budget.unreserve(reserved - used);
        }
        if self.phase == Phase::Stopped || self.restart_pending {
            if used > 0 {
                // Dropped unread: their reservations go back too.
                self.integration.budget.unreserve(used);
            }
            if self.restart_pending {
                self.restart_when_drained(ctx);
            }
            return;
        }
        let output = match result {
            Ok(output) => output,
            Err((code, message)) => return self.fetch_failed(code, message, ctx),
        };
        self.backoff = Duration::ZERO;
        self.records_ready = false;
        let behind = output.millis_behind_latest;
        let fetched = output.records.len();
        self.check_retention_gap(&output);

        if let Err(e) = self.accept(output.records, ctx) {
            tracing::error!(
                integration = %self.name(), stream = %self.stream(), shard = %self.shard_id,
                error = %e, "shard stopped: the stream returned records out of order"
            );
            self.stop(ShardState::Failed, Some(e));
            return;
        }
        self.integration
            .status
            .update(self.name(), &self.shard_id, |s| {
                s.millis_behind_latest = behind;
                s.records_read += fetched as u64;
            });

        // Caught up: wait before the next call, one call interval at first
        // (200 ms for Kinesis; a little for a source without a call limit),
        // longer while it stays caught up. A pushing reader waits for
        // records itself.
        if fetched == 0 && behind == Some(0) && !self.reader().pushes() {
            let first = self.reader().call_interval().max(MIN_IDLE_WAIT);
            self.idle_wait = (self.idle_wait * 2).clamp(first, MAX_IDLE_WAIT);
            self.next_call_at = self.next_call_at.max(Instant::now() + self.idle_wait);
        } else {
            self.idle_wait = Duration::ZERO;
        }

        match output.next_iterator {
            Some(next) => {
                self.iterator = Some(next);
                self.phase = Phase::Idle;
                self.poll(ctx);
            }
            None => self.reached_shard_end(ctx),
        }
    }

    /// On the first read after a stored checkpoint: if the checkpoint is
    /// older than the stream's retention, the records after it may have
    /// expired before they were read. Kinesis cannot say whether any did,
    /// so the possible gap (from the checkpoint's record to the first
    /// record read, or to the trim horizon) is logged at ERROR.
    fn check_retention_gap(&mut self, output: &Fetched) {
        let Some(check) = self.gap_check else {
            return;
        };
        let first = output.records.first();
        if first.is_none() && output.millis_behind_latest != Some(0) {
            // An empty answer that is not caught up says nothing yet.
            return;
        }
        self.gap_check = None;
        if !check.expired() {
            return;
        }
        let (until_ms, until) = match first {
            Some(record) => (record.arrival_ms, "the first record read"),
            None => (check.trim_horizon_ms(), "the trim horizon"),
        };
        tracing::error!(
            integration = %self.name(), stream = %self.stream(), shard = %self.shard_id,
            checkpoint = %self.written_checkpoint.as_ref().map(Done::to_string).unwrap_or_default(),
            checkpoint_arrival_ms = check.checkpoint_ms,
            first_read_sequence_number = first.map(|r| r.sequence_number.as_str()).unwrap_or(""),
            retention_hours = check.retention_ms / 3_600_000,
            gap_ms = until_ms - check.checkpoint_ms,
            "the checkpoint is older than the stream's retention period: records put between it and {until} may have expired unread"
        );
    }

    /// Puts fetched records in the window and sends them to the converter.
    fn accept(&mut self, records: Vec<RawRecord>, ctx: &mut Context<Self>) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(records.len());
        let mut inputs = Vec::with_capacity(records.len());
        for record in records {
            self.last_fetched = Some(record.sequence_number.clone());
            for (sub, source) in self.user_records(record) {
                let bytes = source.payload_share;
                let index = self
                    .window
                    .push(
                        &source.record.sequence_number,
                        sub,
                        bytes,
                        source.budget_records,
                        source.record.arrival_ms,
                    )
                    .map_err(|e| e.to_string())?;
                self.integration.budget.take_bytes(bytes);
                let record = Arc::new(source.record);
                inputs.push(DecodeInput {
                    record: record.clone(),
                });
                batch.push((index, record));
            }
        }

        // Small decode jobs spread a fetch over the converter workers and
        // let the first records enter the chain before the last are decoded.
        let (set, decoder) = self.integration.decoder();
        let mut inputs = inputs.into_iter();
        let mut batch = batch.into_iter();
        loop {
            let records: Vec<_> = batch.by_ref().take(DECODE_CHUNK).collect();
            if records.is_empty() {
                break;
            }
            let job = Decode {
                script: decoder.clone(),
                records: inputs.by_ref().take(records.len()).collect(),
            };
            self.send_decode(job, records, set.clone(), ctx);
        }
        Ok(())
    }

    /// The records a Kinesis record stands for: itself, or the user records
    /// of a KPL aggregate (less those already done before a restart and
    /// those outside the shard's hash key range). Together they hold the
    /// record's budget reservation and bytes.
    fn user_records(&mut self, record: RawRecord) -> Vec<(Option<SubRecord>, Pending)> {
        let skip = self
            .skip_through
            .take()
            .filter(|(sequence, _)| *sequence == record.sequence_number)
            .map(|(_, sub)| sub);
        let config = &self.integration.config;
        let plain = |record: RawRecord| SourceRecord {
            integration: self.origin.0.clone(),
            stream: self.origin.1.clone(),
            shard: self.origin.2.clone(),
            sequence_number: record.sequence_number,
            sub_sequence_number: None,
            partition_key: record.partition_key,
            explicit_hash_key: None,
            arrival_ms: record.arrival_ms,
            payload: record.data,
        };
        let users = match kpl::deaggregate(&record.data) {
            None => None,
            Some(Ok(users)) => Some(users),
            Some(Err(e)) => {
                tracing::warn!(
                    integration = %config.name, stream = %config.stream_name, shard = %self.shard_id,
                    sequence_number = %record.sequence_number, error = %e,
                    "record starts like a KPL aggregate but is not one; passed on as a plain record"
                );
                None
            }
        };
        let Some(users) = users else {
            let bytes = record.data.len();
            return vec![(
                None,
                Pending {
                    record: plain(record),
                    payload_share: bytes,
                    budget_records: 1,
                },
            )];
        };

        let total = record.data.len();
        let mut dropped = 0;
        let mut kept: Vec<(u64, kpl::UserRecord)> = Vec::with_capacity(users.len());
        for (number, user) in users.into_iter().enumerate() {
            let number = number as u64;
            if skip.is_some_and(|done| number <= done) {
                continue;
            }
            let hash = kpl::hash_key(&user.partition_key, user.explicit_hash_key.as_deref());
            let outside = matches!((self.hash_range, hash), (Some((low, high)), Some(h)) if h < low || h > high);
            if outside {
                dropped += 1;
                continue;
            }
            kept.push((number, user));
        }
        if dropped > 0 {
            tracing::warn!(
                integration = %config.name, stream = %config.stream_name, shard = %self.shard_id,
                sequence_number = %record.sequence_number, dropped,
                "user records of a KPL aggregate whose hash key is outside the shard's range were dropped (as the KCL does after a reshard)"
            );
            self.integration
                .status
                .update(&config.name, &self.shard_id, |s| {
                    s.user_records_dropped += dropped;
                });
        }
        if kept.is_empty() {
            // Nothing to do for it: its reservation goes back at once.
            self.integration.budget.give_back(1, 0);
            return Vec::new();
        }

        let count = kept.len();
        let mut shared = 0;
        kept.into_iter()
            .enumerate()
            .map(|(n, (number, user))| {
                let last = n + 1 == count;
                // The last user record also carries the aggregate's own
                // bytes, so that the shares add up to the record's size.
                let share = if last {
                    total - shared
                } else {
                    user.data.len()
                };
                shared += share;
                let source = SourceRecord {
                    integration: self.origin.0.clone(),
                    stream: self.origin.1.clone(),
                    shard: self.origin.2.clone(),
                    sequence_number: record.sequence_number.clone(),
                    sub_sequence_number: Some(number),
                    partition_key: user.partition_key,
                    explicit_hash_key: user.explicit_hash_key,
                    arrival_ms: record.arrival_ms,
                    payload: user.data,
                };
                (
                    Some(SubRecord { number, last }),
                    Pending {
                        record: source,
                        payload_share: share,
                        budget_records: usize::from(last),
                    },
                )
            })
            .collect()
    }

    fn send_decode(
        &mut self,
        job: Decode,
        records: Vec<(u64, Arc<SourceRecord>)>,
        set: Arc<RuleSet>,
        ctx: &mut Context<Self>,
    ) {
        let number = self.batches_sent;
        self.batches_sent += 1;
        let pool = self.integration.js.clone();
        ctx.spawn(
            pool.send(job)
                .into_actor(self)
                .map(move |result, consumer, ctx| {
                    let results =
                        result.unwrap_or_else(|_| vec![Err(ConvertError::PoolGone); records.len()]);
                    consumer.converted.insert(
                        number,
                        ConvertedBatch {
                            set,
                            records,
                            results,
                        },
                    );
                    consumer.forward(ctx);
                }),
        );
    }

    /// Sends converted batches to the chain, strictly in fetch order. The
    /// first batch of a new rule set waits until every earlier record is
    /// done, so a reload cannot let a record overtake an earlier one of
    /// the shard through the new chain's actors.
    fn forward(&mut self, ctx: &mut Context<Self>) {
        while let Some(next) = self.converted.get(&self.next_batch) {
            let version = next.set.version;
            if version != self.forwarded_version {
                let first = next.records.first().map(|(index, _)| *index);
                let earlier_pending = self
                    .window
                    .first_pending()
                    .zip(first)
                    .is_some_and(|(pending, first)| pending < first);
                if earlier_pending {
                    return;
                }
                self.forwarded_version = version;
            }
            let batch = self
                .converted
                .remove(&self.next_batch)
                .expect("the batch was just seen");
            self.next_batch += 1;
            let converted = batch.results.iter().filter(|r| r.is_ok()).count() as u64;
            self.integration
                .status
                .update(self.name(), &self.shard_id, |s| {
                    s.records_converted += converted
                });
            for ((index, source), result) in batch.records.into_iter().zip(batch.results) {
                if matches!(result, Err(ConvertError::PoolGone)) {
                    tracing::error!(integration = %self.name(), shard = %self.shard_id,
                        "shard stopped: the converter pool is gone");
                    self.stop(ShardState::Failed, Some("converter pool is gone".into()));
                    return;
                }
                let ticket = Ticket::new(index, self.sink(ctx), source.clone());
                match result {
                    Ok(uplinks) => self.submit(&uplinks, &source, ticket, &batch.set),
                    Err(e) => self.dead_letter(&source, ticket, e.to_string()),
                }
            }
        }
    }

    fn submit(
        &self,
        uplinks: &[Uplink],
        source: &SourceRecord,
        ticket: Ticket,
        set: &Arc<RuleSet>,
    ) {
        match crate::ingest::uplink_messages(uplinks, source, &self.integration.store, &ticket) {
            Ok(messages) => {
                for msg in messages {
                    set.submit(msg, ticket.clone());
                }
            }
            Err(e) => self.dead_letter(source, ticket, format!("cannot store the device: {e}")),
        }
    }

    fn dead_letter(&self, source: &SourceRecord, ticket: Ticket, error: String) {
        let log = self.failure_log.borrow_mut().allow(Instant::now(), |held_back| {
            tracing::error!(
                integration = %source.integration, stream = %source.stream, shard = %source.shard,
                records = held_back,
                "more records not processed and kept as dead letters, not logged one by one (see shardflow dlq list)"
            );
        });
        if log {
            tracing::error!(
                integration = %source.integration, stream = %source.stream, shard = %source.shard,
                sequence_number = %source.sequence_number, partition_key = %source.partition_key,
                error = %error, "record not processed; kept as a dead letter"
            );
        }
        self.integration
            .status
            .update(self.name(), &self.shard_id, |s| s.records_failed += 1);
        let write = Write::dead_letter(source, error, None, None, None);
        if let Err(e) = self.integration.store.submit(vec![write], Some(ticket)) {
            tracing::error!(integration = %self.name(), shard = %self.shard_id, error = %e, "dead letter not stored");
        }
    }

    fn sink(&mut self, ctx: &mut Context<Self>) -> Arc<dyn CompletionSink> {
        self.sink
            .get_or_insert_with(|| {
                Arc::new(ShardSink {
                    consumer: ctx.address(),
                    done: std::sync::Mutex::new(Vec::new()),
                })
            })
            .clone()
    }

    fn fetch_failed(&mut self, code: String, message: String, ctx: &mut Context<Self>) {
        let error = format!("{code}: {message}");
        if code == "ExpiredIteratorException" {
            tracing::warn!(integration = %self.name(), shard = %self.shard_id, "shard iterator expired; getting a new one");
            self.iterator = None;
            self.position(ctx);
            return;
        }
        let wait = self.next_backoff(&code);
        let throttled = matches!(
            code.as_str(),
            "ProvisionedThroughputExceededException"
                | "LimitExceededException"
                | "ThrottlingException"
        );
        if throttled {
            tracing::warn!(integration = %self.name(), shard = %self.shard_id, retry_in_ms = wait.as_millis() as u64,
                "{} throttled; backing off", self.reader().read_call());
        } else {
            tracing::warn!(integration = %self.name(), stream = %self.stream(), shard = %self.shard_id,
                error = %error, retry_in_ms = wait.as_millis() as u64, "{} failed; retrying", self.reader().read_call());
            self.set_state(ShardState::Retrying, Some(error));
        }
        self.next_call_at = Instant::now() + wait;
        if code == "ResourceNotFoundException" {
            // The stream may have been deleted and re-created: position again.
            ctx.run_later(wait, |consumer, ctx| consumer.position(ctx));
            return;
        }
        self.phase = Phase::Idle;
        self.poll(ctx);
    }

    fn reached_shard_end(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(integration = %self.name(), stream = %self.stream(), shard = %self.shard_id,
            "shard end reached; finishing once its records are done");
        self.iterator = None;
        self.phase = Phase::Ended;
        self.finish_if_done(ctx);
    }

    fn finish_if_done(&mut self, ctx: &mut Context<Self>) {
        if self.phase != Phase::Ended || !self.window.is_empty() || !self.converted.is_empty() {
            return;
        }
        let write = self.checkpoint_write(true);
        let store = self.integration.store.clone();
        ctx.spawn(
            async move { store.write(vec![write], None).await }
                .into_actor(self)
                .map(|result, consumer, ctx| match result {
                    Ok(()) => {
                        tracing::info!(integration = %consumer.name(), shard = %consumer.shard_id, "shard finished");
                        consumer.set_state(ShardState::Finished, None);
                        consumer.integration.shard_finished.notify_one();
                        consumer.phase = Phase::Stopped;
                        for waiter in consumer.drain_waiters.drain(..) {
                            let _ = waiter.send(());
                        }
                        ctx.stop();
                    }
                    Err(e) => tracing::error!(shard = %consumer.shard_id, error = %e, "shard end not recorded"),
                }),
        );
    }

    fn checkpoint_write(&self, shard_end: bool) -> Write {
        let done = self
            .window
            .checkpoint()
            .or(self.written_checkpoint.as_ref())
            .cloned();
        Write::Checkpoint {
            application: self.integration.config.application_name.clone(),
            stream: self.stream().to_string(),
            shard: self.shard_id.clone(),
            sequence_number: done.as_ref().map(|d| d.sequence_number.clone()),
            sub_sequence_number: done.as_ref().and_then(|d| d.sub_sequence_number),
            arrival_ms: done.as_ref().map(|d| d.arrival_ms),
            shard_end,
        }
    }

    /// Writes the checkpoint if it moved. Everything it covers is already
    /// committed (tickets are released only after their commit).
    fn save_checkpoint(&mut self) {
        let current = self.window.checkpoint().cloned();
        if current.is_none() || current == self.written_checkpoint {
            return;
        }
        let write = self.checkpoint_write(false);
        if self.integration.store.submit(vec![write], None).is_ok() {
            self.written_checkpoint = current;
            self.set_state(self.current_state(), None);
        }
    }

    fn current_state(&self) -> ShardState {
        match self.phase {
            Phase::Positioning => ShardState::Starting,
            Phase::Stopped => ShardState::Failed,
            _ => ShardState::Reading,
        }
    }

    fn stop(&mut self, state: ShardState, error: Option<String>) {
        self.phase = Phase::Stopped;
        self.set_state(state, error);
    }

    fn drained(&self) -> bool {
        self.window.is_empty() && self.converted.is_empty()
    }
}

impl Actor for ShardConsumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(
            integration = %self.name(), stream = %self.stream(), shard = %self.shard_id,
            start = ?self.start, "shard consumer started"
        );
        self.set_state(ShardState::Starting, None);
        let interval =
            Duration::from_millis(self.integration.pipeline.checkpoint_interval_ms.max(10));
        ctx.run_interval(interval, |consumer, _| consumer.save_checkpoint());
        self.position(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        tracing::info!(integration = %self.name(), shard = %self.shard_id, "shard consumer stopped");
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Poll;

impl Handler<Poll> for ShardConsumer {
    type Result = ();
    fn handle(&mut self, _: Poll, ctx: &mut Context<Self>) {
        self.poll(ctx);
    }
}

/// Records' tickets were released; the indices wait in the shard's sink.
#[derive(Message)]
#[rtype(result = "()")]
struct RecordsDone;

impl Handler<RecordsDone> for ShardConsumer {
    type Result = ();

    fn handle(&mut self, _: RecordsDone, ctx: &mut Context<Self>) {
        let Some(sink) = self.sink.clone() else {
            return;
        };
        for (index, ok) in sink.take() {
            if !ok {
                tracing::error!(
                    integration = %self.name(), stream = %self.stream(), shard = %self.shard_id,
                    "a record's processing crashed; the shard stops here and its checkpoint does not move past it"
                );
                self.stop(ShardState::Failed, Some("record processing crashed".into()));
                return;
            }
            self.record_done(index);
        }
        if !self.converted.is_empty() {
            // A batch of a new rule set may be waiting for these.
            self.forward(ctx);
        }
        if self.phase == Phase::Blocked && !self.window_full() {
            self.poll(ctx);
        }
        self.finish_if_done(ctx);
        if self.drained() && !self.drain_waiters.is_empty() {
            self.save_checkpoint();
            let store = self.integration.store.clone();
            let waiters = std::mem::take(&mut self.drain_waiters);
            ctx.spawn(
                async move {
                    let _ = store.flush().await;
                    for waiter in waiters {
                        let _ = waiter.send(());
                    }
                }
                .into_actor(self),
            );
        }
    }
}

impl ShardConsumer {
    fn record_done(&mut self, index: u64) {
        if let Some(observe) = self.integration.status.done_observer.get() {
            if let Some(sequence_number) = self.window.sequence_number(index) {
                observe(sequence_number);
            }
        }
        if let Some(timing) = self.window.complete(index) {
            self.integration
                .budget
                .give_back(timing.budget_records, timing.bytes);
            let status = &self.integration.status;
            status.handover_latency.record(timing.since_fetch);
            let since_arrival = crate::msg::now_millis() - timing.arrival_ms;
            status
                .arrival_latency
                .record(Duration::from_millis(since_arrival.max(0) as u64));
            status
                .records_done
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Stops reading and answers once every fetched record is done and the
/// checkpoint is written.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

/// The stream was deleted and created again under the same name: the
/// shard is read afresh from TRIM_HORIZON once its records in flight are
/// done (its old position means nothing in the new stream).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StreamRecreated;

impl Handler<StreamRecreated> for ShardConsumer {
    type Result = ();

    fn handle(&mut self, _: StreamRecreated, ctx: &mut Context<Self>) {
        // A shard read to its end starts afresh too: the new stream's shard
        // of that name is another shard, which must not be recorded as
        // finished when the old one's last records are done.
        if self.phase == Phase::Stopped || self.restart_pending {
            return;
        }
        tracing::warn!(
            integration = %self.name(), stream = %self.stream(), shard = %self.shard_id,
            "the stream was deleted and created again; the shard is read afresh from TRIM_HORIZON once its records in flight are done"
        );
        self.set_state(ShardState::Retrying, Some("stream created again".into()));
        self.restart_pending = true;
        // With a call under way, its answer continues the restart.
        if !matches!(
            self.phase,
            Phase::Fetching | Phase::Waiting | Phase::Positioning
        ) {
            self.restart_when_drained(ctx);
        }
    }
}

impl Handler<Drain> for ShardConsumer {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        if self.phase != Phase::Ended {
            self.phase = Phase::Stopped;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.drained() {
            self.save_checkpoint();
            let store = self.integration.store.clone();
            return Box::pin(async move {
                let _ = store.flush().await;
            });
        }
        self.drain_waiters.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// Collects completed records for the consumer. The store writer releases
/// thousands of tickets per commit; they are handed over in one message
/// rather than one message each.
/// Stops the actor (after a drain, to release what it holds).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Stop> for ShardConsumer {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        self.phase = Phase::Stopped;
        ctx.stop();
    }
}

struct ShardSink {
    consumer: Addr<ShardConsumer>,
    done: std::sync::Mutex<Vec<(u64, bool)>>,
}

impl ShardSink {
    fn take(&self) -> Vec<(u64, bool)> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl CompletionSink for ShardSink {
    fn complete(&self, index: u64, ok: bool) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        // The first completion since the last hand-over sends the wake-up.
        if done.is_empty() {
            self.consumer.do_send(RecordsDone);
        }
        done.push((index, ok));
    }
}

/// An SDK error as (code, message); the code is the service's error name
/// when there is one, and the message is one line.
pub(crate) fn describe<E, R>(error: &aws_sdk_kinesis::error::SdkError<E, R>) -> (String, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_kinesis::error::SdkError;
    if let Some(code) = error.code() {
        let message = error.message().unwrap_or("no message").to_string();
        return (code.to_string(), message);
    }
    let code = match error {
        SdkError::DispatchFailure(_) => "ConnectionFailed",
        SdkError::TimeoutError(_) => "Timeout",
        SdkError::ResponseError(_) => "BadResponse",
        SdkError::ConstructionFailure(_) => "BadRequest",
        _ => "RequestFailed",
    };
    // The causes, outermost first, without Debug dumps.
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !causes.contains(&text) {
            causes.push(text);
        }
        source = cause.source();
    }
    let message = if causes.is_empty() {
        error.to_string()
    } else {
        causes.join(": ")
    };
    (code.to_string(), message)
}
