//! Enhanced fan-out: reading shards through SubscribeToShard, behind the
//! same [`ShardReader`] contract as polling, so the consumer keeps its
//! window, budget, checkpoint and resharding rules.
//!
//! The reader registers a stream consumer named after the application name
//! (or finds the one registered before) and waits until it is ACTIVE; it is
//! never deregistered, so a restart reuses it. Each shard has a feed: one
//! subscription at a time and at most one event's records taken from it
//! but not yet handed to the consumer. A subscription lasts up to five
//! minutes; when it completes, the next one starts AFTER the last
//! ContinuationSequenceNumber it sent (or the last record, or, before any
//! event, the time the first one was asked for when it started at LATEST).
//! A subscription error, including the ResourceInUseException Kinesis
//! answers to a new subscription within five seconds of the last, goes back
//! to the consumer, which backs off with jitter and asks again.
//!
//! Backpressure: events are pulled from a subscription only inside
//! [`ShardReader::wait_ready`], which the consumer calls only while its
//! window and the shared budget have room. While they are full the
//! subscription is not read, and TCP flow control holds Kinesis back.
//!
//! Records at or before the subscription's starting sequence number, or
//! at or before a record already taken, are dropped (with a WARN): Kinesis
//! does not send them, but a server that ignores the starting position
//! (ferrokinesis 0.7 always starts SubscribeToShard at TRIM_HORIZON) would
//! otherwise hand the consumer records twice and out of order.
//!
//! At SHARD_END a subscription reports the shard's children; the feed then
//! ends like a polled shard whose iterator runs out, and the consumer
//! finishes the shard as it does when polling, so children still start only
//! after their parents are done.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::types::{
    ConsumerStatus, ShardIteratorType, StartingPosition, SubscribeToShardEventStream,
};
use aws_sdk_kinesis::Client;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};

use super::consumer::describe;
use super::reader::{raw_record, Fetched, Position, RawRecord, ReadError, ShardInfo, ShardReader};
use super::window::SequenceNumber;
use crate::config::InitialPosition;

/// One event of a subscription.
#[derive(Debug, Clone, Default)]
pub struct FanOutEvent {
    pub records: Vec<RawRecord>,
    /// Where a later subscription may continue (AFTER it); `None` at the
    /// shard's end.
    pub continuation: Option<String>,
    pub millis_behind_latest: Option<i64>,
    /// The shard's children, reported at its end.
    pub child_shards: Vec<String>,
}

/// A subscription's events; the stream ends when the subscription does.
pub type Subscription = BoxStream<'static, Result<FanOutEvent, ReadError>>;

/// The enhanced fan-out calls: the real ones ([`SdkFanOut`]) or a stand-in
/// that produces what Kinesis rarely does (tests).
pub trait FanOutApi: Send + Sync + 'static {
    /// The ARN of the stream consumer `name` of `stream`, registered if
    /// there is none, once it is ACTIVE.
    fn consumer_arn(
        &self,
        stream: &str,
        name: &str,
    ) -> BoxFuture<'static, Result<String, ReadError>>;

    /// Starts a subscription to `shard` at `from`.
    fn subscribe(
        &self,
        consumer_arn: &str,
        shard: &str,
        from: &Position,
    ) -> BoxFuture<'static, Result<Subscription, ReadError>>;
}

/// How often a consumer that is being registered is looked at, and for how
/// long.
const ACTIVE_POLL: Duration = Duration::from_millis(500);
const ACTIVE_WAIT_LIMIT: Duration = Duration::from_secs(120);

/// Enhanced fan-out with the AWS SDK.
pub struct SdkFanOut {
    pub client: Client,
    /// The integration, for log events.
    pub integration: String,
}

impl FanOutApi for SdkFanOut {
    fn consumer_arn(
        &self,
        stream: &str,
        name: &str,
    ) -> BoxFuture<'static, Result<String, ReadError>> {
        let client = self.client.clone();
        let (stream, name, integration) = (
            stream.to_string(),
            name.to_string(),
            self.integration.clone(),
        );
        Box::pin(async move { register(&client, &stream, &name, &integration).await })
    }

    fn subscribe(
        &self,
        consumer_arn: &str,
        shard: &str,
        from: &Position,
    ) -> BoxFuture<'static, Result<Subscription, ReadError>> {
        let request = self
            .client
            .subscribe_to_shard()
            .consumer_arn(consumer_arn)
            .shard_id(shard)
            .starting_position(starting_position(from));
        Box::pin(async move {
            let output = request.send().await.map_err(|e| describe(&e))?;
            let events =
                futures::stream::unfold(Some(output.event_stream), |receiver| async move {
                    let mut receiver = receiver?;
                    match receiver.recv().await {
                        Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event))) => {
                            Some((Ok(fan_out_event(&event)), Some(receiver)))
                        }
                        // A kind of event this SDK does not know: nothing to read.
                        Ok(Some(_)) => Some((Ok(FanOutEvent::default()), Some(receiver))),
                        Ok(None) => None,
                        // An error ends the subscription.
                        Err(e) => Some((Err(describe(&e)), None)),
                    }
                });
            Ok(events.boxed())
        })
    }
}

fn fan_out_event(event: &aws_sdk_kinesis::types::SubscribeToShardEvent) -> FanOutEvent {
    let continuation = event.continuation_sequence_number();
    FanOutEvent {
        records: event.records().iter().map(raw_record).collect(),
        continuation: (!continuation.is_empty()).then(|| continuation.to_string()),
        millis_behind_latest: Some(event.millis_behind_latest()),
        child_shards: event
            .child_shards()
            .iter()
            .map(|c| c.shard_id().to_string())
            .collect(),
    }
}

fn starting_position(from: &Position) -> StartingPosition {
    let builder = StartingPosition::builder();
    let builder = match from {
        Position::After(sequence) => builder
            .r#type(ShardIteratorType::AfterSequenceNumber)
            .sequence_number(sequence),
        Position::At(sequence) => builder
            .r#type(ShardIteratorType::AtSequenceNumber)
            .sequence_number(sequence),
        Position::Initial(InitialPosition::Latest) => builder.r#type(ShardIteratorType::Latest),
        Position::Initial(InitialPosition::TrimHorizon) => {
            builder.r#type(ShardIteratorType::TrimHorizon)
        }
        Position::Initial(InitialPosition::AtTimestamp(ms)) => builder
            .r#type(ShardIteratorType::AtTimestamp)
            .timestamp(aws_smithy_types::DateTime::from_millis(*ms)),
    };
    builder
        .build()
        .expect("a starting position with its type set builds")
}

/// Registers the stream consumer, or finds it, and waits until it is
/// ACTIVE.
pub(crate) async fn register(
    client: &Client,
    stream: &str,
    name: &str,
    integration: &str,
) -> Result<String, ReadError> {
    let summary = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|e| describe(&e))?;
    let stream_arn = summary
        .stream_description_summary()
        .map(|s| s.stream_arn().to_string())
        .ok_or_else(|| {
            (
                "BadResponse".to_string(),
                "no stream description".to_string(),
            )
        })?;

    let waited = std::time::Instant::now();
    loop {
        let registered = client
            .register_stream_consumer()
            .stream_arn(&stream_arn)
            .consumer_name(name)
            .send()
            .await;
        let arn = match registered {
            Ok(output) => {
                let arn = output
                    .consumer()
                    .map(|c| c.consumer_arn().to_string())
                    .ok_or_else(|| {
                        (
                            "BadResponse".to_string(),
                            "no consumer in the answer".to_string(),
                        )
                    })?;
                tracing::info!(integration, stream, consumer = name, consumer_arn = %arn,
                    "enhanced fan-out: stream consumer registered");
                arn
            }
            Err(e) => {
                let (code, message) = describe(&e);
                if code != "ResourceInUseException" {
                    return Err((code, message));
                }
                // It exists: registered by an earlier run, or being deleted.
                let found = client
                    .describe_stream_consumer()
                    .stream_arn(&stream_arn)
                    .consumer_name(name)
                    .send()
                    .await
                    .map_err(|e| describe(&e))?;
                let Some(consumer) = found.consumer_description() else {
                    return Err(("BadResponse".into(), "no consumer description".into()));
                };
                if *consumer.consumer_status() == ConsumerStatus::Deleting {
                    if waited.elapsed() > ACTIVE_WAIT_LIMIT {
                        return Err((
                            "ConsumerDeleting".into(),
                            format!("stream consumer {name} is being deleted"),
                        ));
                    }
                    tokio::time::sleep(ACTIVE_POLL).await;
                    continue;
                }
                tracing::info!(integration, stream, consumer = name,
                    consumer_arn = %consumer.consumer_arn(), "enhanced fan-out: stream consumer found");
                consumer.consumer_arn().to_string()
            }
        };
        return wait_active(client, &arn, name).await.map(|()| arn);
    }
}

async fn wait_active(client: &Client, arn: &str, name: &str) -> Result<(), ReadError> {
    let waited = std::time::Instant::now();
    loop {
        let described = client
            .describe_stream_consumer()
            .consumer_arn(arn)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let status = described
            .consumer_description()
            .map(|c| c.consumer_status().clone());
        if status == Some(ConsumerStatus::Active) {
            return Ok(());
        }
        if waited.elapsed() > ACTIVE_WAIT_LIMIT {
            return Err((
                "ConsumerNotActive".into(),
                format!("stream consumer {name} is still {status:?} after {ACTIVE_WAIT_LIMIT:?}"),
            ));
        }
        tokio::time::sleep(ACTIVE_POLL).await;
    }
}

/// A shard's subscriptions and the records taken from them but not yet
/// handed over.
struct Feed {
    generation: u64,
    /// Where the next subscription starts.
    from: Position,
    subscription: Option<Subscription>,
    buffered: VecDeque<RawRecord>,
    /// The shard's end was reported.
    ended: bool,
    behind: Option<i64>,
    /// Records must come after this one (or be this one, when inclusive).
    floor: Option<(SequenceNumber, bool)>,
}

/// The floor a starting position sets (see the module docs).
fn floor_of(position: &Position) -> Option<(SequenceNumber, bool)> {
    match position {
        Position::After(sequence) => Some((SequenceNumber::parse(sequence)?, false)),
        Position::At(sequence) => Some((SequenceNumber::parse(sequence)?, true)),
        Position::Initial(_) => None,
    }
}

impl Feed {
    fn new(generation: u64, from: Position) -> Feed {
        Feed {
            generation,
            floor: floor_of(&from),
            from,
            subscription: None,
            buffered: VecDeque::new(),
            ended: false,
            behind: None,
        }
    }

    /// Takes in one event; see the module docs for where the next
    /// subscription starts. Returns how many records it dropped as not
    /// after the floor.
    fn take(&mut self, mut event: FanOutEvent) -> usize {
        self.behind = event.millis_behind_latest.or(self.behind);
        let empty = event.records.is_empty();
        let before = event.records.len();
        if let Some((floor, inclusive)) = &self.floor {
            event.records.retain(|r| {
                SequenceNumber::parse(&r.sequence_number)
                    .is_none_or(|s| s > *floor || (*inclusive && s == *floor))
            });
        }
        let dropped = before - event.records.len();
        if let Some(last) = event.records.last() {
            if let Some(sequence) = SequenceNumber::parse(&last.sequence_number) {
                self.floor = Some((sequence, false));
            }
        }
        if let Some(last) = event.records.last() {
            self.from = Position::After(last.sequence_number.clone());
        }
        if let Some(continuation) = &event.continuation {
            self.from = Position::After(continuation.clone());
        }
        self.buffered.extend(event.records);
        // Kinesis reports the children with the shard's last event (which
        // has no continuation); some emulators report them on every event
        // of a closed shard, and only an event with no records is the last.
        if !event.child_shards.is_empty() && (event.continuation.is_none() || empty) {
            self.ended = true;
            self.subscription = None;
        }
        dropped
    }
}

/// Reads shards with enhanced fan-out; lists them (and reads the stream's
/// description) with `polling`.
pub struct FanOutReader {
    polling: Arc<dyn ShardReader>,
    api: Arc<dyn FanOutApi>,
    stream: String,
    consumer_name: String,
    integration: String,
    consumer_arn: Arc<tokio::sync::Mutex<Option<String>>>,
    feeds: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Feed>>>>,
    generation: AtomicU64,
    io: tokio::runtime::Handle,
}

impl FanOutReader {
    pub fn new(
        polling: Arc<dyn ShardReader>,
        api: Arc<dyn FanOutApi>,
        stream: &str,
        consumer_name: &str,
        integration: &str,
        io: tokio::runtime::Handle,
    ) -> FanOutReader {
        FanOutReader {
            polling,
            api,
            stream: stream.to_string(),
            consumer_name: consumer_name.to_string(),
            integration: integration.to_string(),
            consumer_arn: Arc::default(),
            feeds: Mutex::default(),
            generation: AtomicU64::new(0),
            io,
        }
    }

    fn spawn<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, ReadError>> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, ReadError>> {
        super::reader::on_io(&self.io, work)
    }

    /// The feed a token (`shard#generation`) belongs to, if it is current.
    fn feed(&self, token: &str) -> Result<(Arc<tokio::sync::Mutex<Feed>>, u64), ReadError> {
        let stale = || {
            (
                "ExpiredIteratorException".to_string(),
                "a newer subscription replaced this one".to_string(),
            )
        };
        let (shard, generation) = token.rsplit_once('#').ok_or_else(stale)?;
        let generation: u64 = generation.parse().map_err(|_| stale())?;
        let feeds = self.feeds.lock().expect("feeds lock");
        let feed = feeds.get(shard).cloned().ok_or_else(stale)?;
        Ok((feed, generation))
    }

    fn subscriber(&self) -> Subscriber {
        Subscriber {
            api: self.api.clone(),
            arn: self.consumer_arn.clone(),
            stream: self.stream.clone(),
            name: self.consumer_name.clone(),
        }
    }
}

/// What a feed needs to subscribe, detached from the reader so that it can
/// run on the I/O runtime.
#[derive(Clone)]
struct Subscriber {
    api: Arc<dyn FanOutApi>,
    arn: Arc<tokio::sync::Mutex<Option<String>>>,
    stream: String,
    name: String,
}

impl Subscriber {
    /// The consumer's ARN, registering it the first time; one registration
    /// at a time for all shards.
    async fn arn(&self) -> Result<String, ReadError> {
        let mut arn = self.arn.lock().await;
        if let Some(known) = arn.as_ref() {
            return Ok(known.clone());
        }
        let found = self.api.consumer_arn(&self.stream, &self.name).await?;
        *arn = Some(found.clone());
        Ok(found)
    }

    async fn subscribe(&self, shard: &str, from: &Position) -> Result<Subscription, ReadError> {
        let arn = self.arn().await?;
        match self.api.subscribe(&arn, shard, from).await {
            Err((code, message)) if code == "ResourceNotFoundException" => {
                // The consumer (or its stream) is gone: find it again next
                // time.
                *self.arn.lock().await = None;
                Err((code, message))
            }
            other => other,
        }
    }
}

/// Where the next subscription starts once one started at `from`: LATEST
/// becomes the time it was asked for, so a renewal before any event does
/// not skip what arrived in between.
fn after_start(from: &Position, asked_at_ms: i64) -> Position {
    match from {
        Position::Initial(InitialPosition::Latest) => {
            Position::Initial(InitialPosition::AtTimestamp(asked_at_ms))
        }
        other => other.clone(),
    }
}

impl ShardReader for FanOutReader {
    fn shards(&self, stream: &str) -> BoxFuture<'static, Result<Vec<ShardInfo>, ReadError>> {
        self.polling.shards(stream)
    }

    fn created_ms(&self, stream: &str) -> BoxFuture<'static, Result<Option<i64>, ReadError>> {
        self.polling.created_ms(stream)
    }

    fn retention_hours(&self, stream: &str) -> BoxFuture<'static, Result<Option<i64>, ReadError>> {
        self.polling.retention_hours(stream)
    }

    /// Starts the shard's first subscription, so that a refused starting
    /// point fails here, as GetShardIterator would.
    fn iterator(
        &self,
        _stream: &str,
        shard: &str,
        position: &Position,
    ) -> BoxFuture<'static, Result<Option<String>, ReadError>> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let feed = Arc::new(tokio::sync::Mutex::new(Feed::new(
            generation,
            position.clone(),
        )));
        // The old feed (and its subscription) is dropped.
        self.feeds
            .lock()
            .expect("feeds lock")
            .insert(shard.to_string(), feed.clone());
        let subscriber = self.subscriber();
        let (shard, position) = (shard.to_string(), position.clone());
        self.spawn(async move {
            let asked_at = crate::msg::now_millis();
            let subscription = subscriber.subscribe(&shard, &position).await?;
            let mut feed = feed.lock().await;
            feed.subscription = Some(subscription);
            feed.from = after_start(&position, asked_at);
            Ok(Some(format!("{shard}#{generation}")))
        })
    }

    fn wait_ready(&self, token: &str) -> BoxFuture<'static, Result<(), ReadError>> {
        let found = self.feed(token);
        let subscriber = self.subscriber();
        let (token, integration) = (token.to_string(), self.integration.clone());
        self.spawn(async move {
            let (feed, generation) = found?;
            let mut feed = feed.lock().await;
            if feed.generation != generation {
                return Err((
                    "ExpiredIteratorException".into(),
                    "a newer subscription replaced this one".into(),
                ));
            }
            let shard = token
                .rsplit_once('#')
                .map(|(s, _)| s)
                .unwrap_or_default()
                .to_string();
            loop {
                if !feed.buffered.is_empty() || feed.ended {
                    return Ok(());
                }
                if feed.subscription.is_none() {
                    let from = feed.from.clone();
                    tracing::debug!(integration = %integration, shard = %shard, from = ?from,
                        "enhanced fan-out: subscribing again");
                    let asked_at = crate::msg::now_millis();
                    let subscription = subscriber.subscribe(&shard, &from).await?;
                    feed.from = after_start(&from, asked_at);
                    feed.subscription = Some(subscription);
                }
                let next = match feed.subscription.as_mut() {
                    Some(subscription) => subscription.next().await,
                    None => None,
                };
                match next {
                    Some(Ok(event)) => {
                        let dropped = feed.take(event);
                        if dropped > 0 {
                            tracing::warn!(integration = %integration, shard = %shard, dropped,
                                "enhanced fan-out: the subscription sent records before its starting position; dropped (they were read already)");
                        }
                    }
                    Some(Err(e)) => {
                        feed.subscription = None;
                        return Err(e);
                    }
                    // The subscription completed (five minutes, or earlier):
                    // the next one continues where it stopped.
                    None => feed.subscription = None,
                }
            }
        })
    }

    fn records(&self, token: String, limit: i32) -> BoxFuture<'static, Result<Fetched, ReadError>> {
        let found = self.feed(&token);
        self.spawn(async move {
            let (feed, generation) = found?;
            let mut feed = feed.lock().await;
            if feed.generation != generation {
                return Err((
                    "ExpiredIteratorException".into(),
                    "a newer subscription replaced this one".into(),
                ));
            }
            let count = (limit.max(0) as usize).min(feed.buffered.len());
            let records: Vec<RawRecord> = feed.buffered.drain(..count).collect();
            let next_iterator = (!(feed.ended && feed.buffered.is_empty())).then_some(token);
            Ok(Fetched {
                records,
                next_iterator,
                millis_behind_latest: feed.behind,
            })
        })
    }

    fn call_interval(&self) -> Duration {
        Duration::ZERO
    }

    fn pushes(&self) -> bool {
        true
    }

    fn read_call(&self) -> &'static str {
        "SubscribeToShard"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sequence: &str) -> RawRecord {
        RawRecord {
            sequence_number: sequence.into(),
            partition_key: "k".into(),
            arrival_ms: 0,
            data: bytes::Bytes::from_static(b"x"),
        }
    }

    fn feed() -> Feed {
        Feed::new(1, Position::Initial(InitialPosition::TrimHorizon))
    }

    #[test]
    fn records_before_the_starting_position_are_dropped() {
        let mut feed = Feed::new(1, Position::After("11".into()));
        let event = |seqs: &[&str]| FanOutEvent {
            records: seqs.iter().map(|s| record(s)).collect(),
            continuation: Some("99".into()),
            millis_behind_latest: Some(0),
            child_shards: vec![],
        };
        assert_eq!(feed.take(event(&["9", "10", "11", "12"])), 3);
        // Sent again by a renewal that started too early.
        assert_eq!(feed.take(event(&["11", "12", "13"])), 2);
        let kept: Vec<&str> = feed
            .buffered
            .iter()
            .map(|r| r.sequence_number.as_str())
            .collect();
        assert_eq!(kept, ["12", "13"]);
        let mut at = Feed::new(1, Position::At("5".into()));
        assert_eq!(at.take(event(&["4", "5", "6"])), 1);
    }

    #[test]
    fn renewals_continue_after_the_continuation_and_end_at_shard_end() {
        let mut feed = feed();
        feed.take(FanOutEvent {
            records: vec![record("10"), record("11")],
            continuation: Some("12".into()),
            millis_behind_latest: Some(5),
            child_shards: vec![],
        });
        assert!(matches!(&feed.from, Position::After(s) if s == "12"));
        assert_eq!(feed.buffered.len(), 2);
        assert_eq!(feed.behind, Some(5));
        // A closed shard's event with records is not its last.
        feed.take(FanOutEvent {
            records: vec![record("13")],
            continuation: Some("14".into()),
            millis_behind_latest: Some(0),
            child_shards: vec!["shardId-000000000001".into()],
        });
        assert!(!feed.ended);
        // No continuation with the children: the end.
        feed.take(FanOutEvent {
            records: vec![record("15")],
            continuation: None,
            millis_behind_latest: Some(0),
            child_shards: vec!["shardId-000000000001".into()],
        });
        assert!(feed.ended);
        assert_eq!(feed.buffered.len(), 4);
    }

    #[test]
    fn latest_is_renewed_at_the_time_it_was_asked_for() {
        assert!(matches!(
            after_start(&Position::Initial(InitialPosition::Latest), 1234),
            Position::Initial(InitialPosition::AtTimestamp(1234))
        ));
        assert!(matches!(
            after_start(&Position::After("7".into()), 1234),
            Position::After(s) if s == "7"
        ));
    }
}
