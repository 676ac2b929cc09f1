//! Enhanced fan-out faults the emulator cannot produce, from a stand-in for
//! the SubscribeToShard calls: a subscription that ends early, renewals
//! refused with ResourceInUseException (as Kinesis does within five seconds
//! of the last subscription), an error in the middle of a subscription, and
//! a push stream faster than the pipeline (the window must stop the reading).
//! The real fan-out reader, consumer, converter pool, chain and store run.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use shardflow::config::Config;
use shardflow::kinesis::fan_out::{FanOutApi, FanOutEvent, FanOutReader, Subscription};
use shardflow::kinesis::reader::{Fetched, Position, RawRecord, ReadError, ShardInfo, ShardReader};
use shardflow::store::Store;

const SHARD: &str = "shardId-000000000000";

/// Lists one shard; reading goes through fan-out only.
struct OneShard;

impl ShardReader for OneShard {
    fn shards(&self, _: &str) -> BoxFuture<'static, Result<Vec<ShardInfo>, ReadError>> {
        Box::pin(async {
            Ok(vec![ShardInfo {
                id: SHARD.into(),
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
        _: &Position,
    ) -> BoxFuture<'static, Result<Option<String>, ReadError>> {
        unreachable!("fan-out positions itself")
    }
    fn records(&self, _: String, _: i32) -> BoxFuture<'static, Result<Fetched, ReadError>> {
        unreachable!("fan-out reads itself")
    }
    fn call_interval(&self) -> Duration {
        Duration::ZERO
    }
}

/// What one subscription does.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// Sends this many events, then completes (before the shard's end).
    EndAfter(usize),
    /// Refused: another subscription started less than five seconds ago.
    ResourceInUse,
    /// Sends this many events, then fails.
    FailAfter(usize),
    /// Sends everything left, then reports the shard's end.
    ToShardEnd,
}

/// A shard of `total` records (sequence numbers 1..=total) served in
/// events of `per_event`; continuation = the event's last sequence number.
struct StandIn {
    total: usize,
    per_event: usize,
    script: Mutex<VecDeque<Act>>,
    /// Every subscribe call: where it asked to start, and what it got.
    calls: Mutex<Vec<(String, Act)>>,
    /// Records the subscriptions have sent so far.
    pulled: Arc<AtomicUsize>,
}

impl StandIn {
    fn new(total: usize, per_event: usize, script: &[Act]) -> StandIn {
        StandIn {
            total,
            per_event,
            script: Mutex::new(script.iter().copied().collect()),
            calls: Mutex::default(),
            pulled: Arc::default(),
        }
    }
}

fn record(n: usize) -> RawRecord {
    RawRecord {
        sequence_number: n.to_string(),
        partition_key: format!("k{}", n % 7),
        arrival_ms: 1_700_000_000_000,
        data: Bytes::from(format!(r#"{{"seq": {n}}}"#)),
    }
}

impl FanOutApi for StandIn {
    fn consumer_arn(&self, _: &str, name: &str) -> BoxFuture<'static, Result<String, ReadError>> {
        let arn = format!("arn:aws:kinesis:us-east-1:000000000000:stream/s/consumer/{name}:1");
        Box::pin(async move { Ok(arn) })
    }

    fn subscribe(
        &self,
        _: &str,
        _: &str,
        from: &Position,
    ) -> BoxFuture<'static, Result<Subscription, ReadError>> {
        let act = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Act::ToShardEnd);
        self.calls.lock().unwrap().push((format!("{from:?}"), act));
        let first = match from {
            Position::After(s) => s.parse::<usize>().unwrap() + 1,
            Position::At(s) => s.parse::<usize>().unwrap(),
            Position::Initial(_) => 1,
        };
        let (total, per_event, pulled) = (self.total, self.per_event, self.pulled.clone());
        Box::pin(async move {
            if let Act::ResourceInUse = act {
                return Err((
                    "ResourceInUseException".to_string(),
                    "Another active subscription exists for this consumer".to_string(),
                ));
            }
            let mut events: Vec<Result<FanOutEvent, ReadError>> = Vec::new();
            let mut next = first;
            let limit = match act {
                Act::EndAfter(n) | Act::FailAfter(n) => n,
                _ => usize::MAX,
            };
            while next <= total && events.len() < limit {
                let last = (next + per_event - 1).min(total);
                events.push(Ok(FanOutEvent {
                    records: (next..=last).map(record).collect(),
                    continuation: Some(last.to_string()),
                    millis_behind_latest: Some(((total - last) * 10) as i64),
                    child_shards: vec![],
                }));
                next = last + 1;
            }
            match act {
                Act::FailAfter(_) => events.push(Err((
                    "InternalFailureException".to_string(),
                    "the subscription broke".to_string(),
                ))),
                Act::ToShardEnd => events.push(Ok(FanOutEvent {
                    records: vec![],
                    continuation: None,
                    millis_behind_latest: Some(0),
                    child_shards: vec!["shardId-000000000001".into()],
                })),
                _ => {}
            }
            // Counted as the consumer pulls them, not when made.
            let stream = futures::stream::iter(events).inspect(move |event| {
                if let Ok(event) = event {
                    pulled.fetch_add(event.records.len(), Ordering::SeqCst);
                }
            });
            Ok(stream.boxed())
        })
    }
}

fn config(dir: &std::path::Path, converter: &str, pipeline: &str) -> Config {
    common::standin::workspace(
        dir,
        "pushed",
        converter,
        &format!("[pipeline]\n{pipeline}"),
        "initial_position = \"TRIM_HORIZON\"\nuse_enhanced_fan_out = true",
    )
}

const CONVERTER: &str = r#"
var data = decodeToJson(payload);
return { deviceName: "d", telemetry: { ts: 1700000000000 + data.seq, values: { seq: data.seq } } };
"#;

/// Runs the pipeline on the stand-in until `until` holds; `sample` is
/// called with the records done on every check.
fn run(
    config: Config,
    stand_in: Arc<StandIn>,
    mut sample: impl FnMut(u64),
    until: impl Fn(&Store, u64) -> bool,
) -> Store {
    common::standin::run_until(
        &config,
        move |c, io| {
            Arc::new(FanOutReader::new(
                Arc::new(OneShard),
                stand_in.clone(),
                &c.stream_name,
                &c.application_name,
                &c.name,
                io.clone(),
            )) as Arc<dyn ShardReader>
        },
        |store, done| {
            sample(done);
            until(store, done)
        },
    )
}

fn shard_end(store: &Store) -> bool {
    store
        .checkpoint("shardflow-kinesis_integration", "pushed", SHARD)
        .unwrap()
        .is_some_and(|c| c.shard_end)
}

#[test]
fn early_ends_refused_renewals_and_broken_subscriptions_lose_and_repeat_nothing() {
    const TOTAL: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), CONVERTER, "");
    let script = [
        Act::EndAfter(2),
        Act::ResourceInUse,
        Act::ResourceInUse,
        Act::FailAfter(1),
        Act::EndAfter(3),
    ];
    let stand_in = Arc::new(StandIn::new(TOTAL, 7, &script));
    let store = run(
        config,
        stand_in.clone(),
        |_| {},
        |store, _| shard_end(store),
    );

    let device = store
        .entity_by_name(shardflow::msg::EntityType::Device, "d")
        .unwrap();
    assert_eq!(store.history_count(device.id).unwrap(), TOTAL as i64);
    let checkpoint = store
        .checkpoint("shardflow-kinesis_integration", "pushed", SHARD)
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.sequence_number.as_deref(), Some("100"));

    // Each renewal starts after the last continuation it was sent.
    let calls = stand_in.calls.lock().unwrap().clone();
    let from: Vec<&str> = calls.iter().map(|(from, _)| from.as_str()).collect();
    assert_eq!(
        from,
        [
            "Initial(TrimHorizon)",
            "After(\"14\")",
            "After(\"14\")",
            "After(\"14\")",
            "After(\"21\")",
            "After(\"42\")",
        ],
        "{calls:?}"
    );
}

#[test]
fn a_full_window_stops_reading_the_push_stream() {
    const TOTAL: usize = 3000;
    const WINDOW: u64 = 100;
    const PER_EVENT: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    // A slow converter: the subscription could push far faster.
    let slow = format!("var until = Date.now() + 1; while (Date.now() < until) {{}}\n{CONVERTER}");
    let pipeline = format!("max_in_flight_records = {WINDOW}");
    let config = config(dir.path(), &slow, &pipeline);
    let stand_in = Arc::new(StandIn::new(TOTAL, PER_EVENT, &[]));
    let pulled = stand_in.pulled.clone();
    let mut worst = 0u64;
    let store = run(
        config,
        stand_in,
        |done| {
            let ahead = (pulled.load(Ordering::SeqCst) as u64).saturating_sub(done);
            worst = worst.max(ahead);
            // Taken but not done: the window, plus at most one event
            // waiting in the reader and one fetch beyond the window.
            assert!(
                ahead <= WINDOW + 2 * PER_EVENT as u64,
                "{ahead} records taken from the subscription but not done"
            );
        },
        |store, _| shard_end(store),
    );
    let device = store
        .entity_by_name(shardflow::msg::EntityType::Device, "d")
        .unwrap();
    assert_eq!(store.history_count(device.id).unwrap(), TOTAL as i64);
    assert!(worst >= WINDOW / 2, "the window did fill up: {worst}");
}
