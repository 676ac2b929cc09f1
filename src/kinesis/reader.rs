//! How a shard consumer reads: the Kinesis API (`KinesisReader`), or any
//! other source of shard records with the same contract (the benchmark's
//! in-process generator).
//!
//! The consumer owns pacing, windows and checkpoints; a reader only lists
//! shards, positions an iterator and returns the next records.

use std::time::Duration;

use aws_sdk_kinesis::types::ShardIteratorType;
use aws_sdk_kinesis::Client;
use bytes::Bytes;
use futures::future::BoxFuture;

use super::consumer::describe;
use crate::config::InitialPosition;

/// A failed call: the service's error code (e.g.
/// `ProvisionedThroughputExceededException`) and its message.
pub type ReadError = (String, String);

/// Where a shard iterator starts.
#[derive(Debug, Clone)]
pub enum Position {
    /// Right after this sequence number (a checkpoint, or the last record
    /// fetched).
    After(String),
    /// At this sequence number: a checkpoint inside a KPL aggregate, whose
    /// record is read again to reach the user records after it.
    At(String),
    Initial(InitialPosition),
}

/// A shard as listed, with the shards it was split or merged from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    /// ParentShardId and AdjacentParentShardId, when present.
    pub parents: Vec<String>,
    /// The shard's hash key range (inclusive), when known: user records of
    /// a KPL aggregate outside it are dropped, as the KCL does.
    pub hash_range: Option<(u128, u128)>,
}

/// One record as read from a shard.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub sequence_number: String,
    pub partition_key: String,
    /// ApproximateArrivalTimestamp, epoch milliseconds.
    pub arrival_ms: i64,
    pub data: Bytes,
}

/// One GetRecords answer.
#[derive(Debug)]
pub struct Fetched {
    pub records: Vec<RawRecord>,
    /// `None` at SHARD_END.
    pub next_iterator: Option<String>,
    pub millis_behind_latest: Option<i64>,
}

pub trait ShardReader: Send + Sync + 'static {
    /// The stream's shards.
    fn shards(&self, stream: &str) -> BoxFuture<'static, Result<Vec<ShardInfo>, ReadError>>;

    /// When the stream was created (epoch ms), which tells a stream from
    /// one deleted and created again under the same name; `None` if the
    /// source has no such notion.
    fn created_ms(&self, stream: &str) -> BoxFuture<'static, Result<Option<i64>, ReadError>>;

    /// A shard iterator at `position`; `None` when the shard has ended.
    fn iterator(
        &self,
        stream: &str,
        shard: &str,
        position: &Position,
    ) -> BoxFuture<'static, Result<Option<String>, ReadError>>;

    /// Up to `limit` records from `iterator`.
    fn records(
        &self,
        iterator: String,
        limit: i32,
    ) -> BoxFuture<'static, Result<Fetched, ReadError>>;

    /// Least time between two `records` calls on one shard.
    fn call_interval(&self) -> Duration;

    /// The stream's retention period in hours, to tell a checkpoint whose
    /// next records may have expired; `None` if unknown.
    fn retention_hours(&self, _stream: &str) -> BoxFuture<'static, Result<Option<i64>, ReadError>> {
        Box::pin(async { Ok(None) })
    }

    /// Whether records are pushed to the reader (enhanced fan-out) rather
    /// than polled: the consumer then calls [`ShardReader::wait_ready`]
    /// before it reserves room for records, and never waits between calls.
    fn pushes(&self) -> bool {
        false
    }

    /// Waits until `records` on `iterator` can answer at once (records, the
    /// shard's end, or an error are there), without taking any. A polling
    /// reader answers at once.
    fn wait_ready(&self, _iterator: &str) -> BoxFuture<'static, Result<(), ReadError>> {
        Box::pin(async { Ok(()) })
    }

    /// The API call that reads records, for log messages.
    fn read_call(&self) -> &'static str {
        "GetRecords"
    }
}

/// Reads with the AWS SDK; calls run on the I/O runtime.
pub struct KinesisReader {
    pub client: Client,
    pub io: tokio::runtime::Handle,
}

/// Kinesis allows five GetRecords calls per second per shard.
const KINESIS_CALL_INTERVAL: Duration = Duration::from_millis(200);

/// Runs an SDK call on the I/O runtime (the actors' threads have their
/// own small runtimes); a task that dies answers with an error.
pub(super) fn on_io<T: Send + 'static>(
    io: &tokio::runtime::Handle,
    work: impl std::future::Future<Output = Result<T, ReadError>> + Send + 'static,
) -> BoxFuture<'static, Result<T, ReadError>> {
    let task = io.spawn(work);
    Box::pin(async move {
        task.await
            .unwrap_or_else(|e| Err(("TaskFailed".into(), e.to_string())))
    })
}

impl KinesisReader {
    fn spawn<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, ReadError>> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, ReadError>> {
        on_io(&self.io, work)
    }
}

impl ShardReader for KinesisReader {
    fn shards(&self, stream: &str) -> BoxFuture<'static, Result<Vec<ShardInfo>, ReadError>> {
        let client = self.client.clone();
        let stream = stream.to_string();
        self.spawn(async move {
            let shards = super::list_shards(&client, &stream).await?;
            Ok(shards.iter().map(shard_info).collect())
        })
    }

    fn created_ms(&self, stream: &str) -> BoxFuture<'static, Result<Option<i64>, ReadError>> {
        let request = self.client.describe_stream_summary().stream_name(stream);
        self.spawn(async move {
            let output = request.send().await.map_err(|e| describe(&e))?;
            Ok(output
                .stream_description_summary()
                .and_then(|d| d.stream_creation_timestamp().to_millis().ok()))
        })
    }

    fn iterator(
        &self,
        stream: &str,
        shard: &str,
        position: &Position,
    ) -> BoxFuture<'static, Result<Option<String>, ReadError>> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard);
        let request = match position.clone() {
            Position::After(sequence) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(sequence),
            Position::At(sequence) => request
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(sequence),
            Position::Initial(InitialPosition::Latest) => {
                request.shard_iterator_type(ShardIteratorType::Latest)
            }
            Position::Initial(InitialPosition::TrimHorizon) => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            Position::Initial(InitialPosition::AtTimestamp(ms)) => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(aws_smithy_types::DateTime::from_millis(ms)),
        };
        self.spawn(async move {
            request
                .send()
                .await
                .map(|out| out.shard_iterator().map(str::to_string))
                .map_err(|e| describe(&e))
        })
    }

    fn records(
        &self,
        iterator: String,
        limit: i32,
    ) -> BoxFuture<'static, Result<Fetched, ReadError>> {
        let request = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit);
        self.spawn(async move {
            let output = request.send().await.map_err(|e| describe(&e))?;
            let records = output.records().iter().map(raw_record).collect();
            Ok(Fetched {
                records,
                next_iterator: output.next_shard_iterator().map(str::to_string),
                millis_behind_latest: output.millis_behind_latest(),
            })
        })
    }

    fn call_interval(&self) -> Duration {
        KINESIS_CALL_INTERVAL
    }

    fn retention_hours(&self, stream: &str) -> BoxFuture<'static, Result<Option<i64>, ReadError>> {
        let request = self.client.describe_stream_summary().stream_name(stream);
        self.spawn(async move {
            let output = request.send().await.map_err(|e| describe(&e))?;
            Ok(output
                .stream_description_summary()
                .map(|d| i64::from(d.retention_period_hours())))
        })
    }
}

/// A record as the SDK returns it, as the consumer needs it.
pub(crate) fn raw_record(record: &aws_sdk_kinesis::types::Record) -> RawRecord {
    RawRecord {
        sequence_number: record.sequence_number().to_string(),
        partition_key: record.partition_key().unwrap_or_default().to_string(),
        arrival_ms: record
            .approximate_arrival_timestamp()
            .and_then(|t| t.to_millis().ok())
            .unwrap_or_else(crate::msg::now_millis),
        data: Bytes::copy_from_slice(record.data().as_ref()),
    }
}

/// A listed shard as the consumer needs it.
pub fn shard_info(shard: &aws_sdk_kinesis::types::Shard) -> ShardInfo {
    let hash_range = shard.hash_key_range().and_then(|range| {
        Some((
            super::kpl::parse_hash_key(range.starting_hash_key())?,
            super::kpl::parse_hash_key(range.ending_hash_key())?,
        ))
    });
    ShardInfo {
        id: shard.shard_id().to_string(),
        parents: shard
            .parent_shard_id()
            .into_iter()
            .chain(shard.adjacent_parent_shard_id())
            .map(str::to_string)
            .collect(),
        hash_range,
    }
}
