//! What each shard consumer is doing, for `/ready`, `/metrics` and logs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A latency histogram with log-spaced buckets (10 % wide, from 10 µs to
/// about 10 minutes), cheap to record from any thread.
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

const FIRST_BUCKET_MICROS: f64 = 10.0;
const GROWTH: f64 = 1.1;
const BUCKETS: usize = 190;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, value: Duration) {
        let micros = value.as_micros() as f64;
        let index = if micros <= FIRST_BUCKET_MICROS {
            0
        } else {
            ((micros / FIRST_BUCKET_MICROS).ln() / GROWTH.ln()).ceil() as usize
        };
        self.buckets[index.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    /// Writes the histogram in Prometheus' text format, in seconds, with
    /// the usual `le` buckets (each to within a bucket's 10 % width).
    pub fn write_prometheus(&self, text: &mut String, name: &str, help: &str) {
        use std::fmt::Write as _;
        const BOUNDS: [f64; 16] = [
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} histogram");
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        for bound in BOUNDS {
            let below: u64 = counts
                .iter()
                .enumerate()
                .filter(|(i, _)| FIRST_BUCKET_MICROS * GROWTH.powi(*i as i32) <= bound * 1e6)
                .map(|(_, c)| c)
                .sum();
            let _ = writeln!(text, "{name}_bucket{{le=\"{bound}\"}} {below}");
        }
        let total: u64 = counts.iter().sum();
        let _ = writeln!(text, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(text, "{name}_sum {sum}\n{name}_count {total}");
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The value below which `q` (0..=1) of the recorded values fall, to
    /// within a bucket's width; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= rank {
                let micros = FIRST_BUCKET_MICROS * GROWTH.powi(index as i32);
                return Some(Duration::from_micros(micros as u64));
            }
        }
        None
    }

    pub fn reset(&self) {
        for bucket in &self.buckets {
            bucket.store(0, Ordering::Relaxed);
        }
    }
}

/// A shard consumer's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardState {
    /// Reading its checkpoint and getting a shard iterator.
    Starting,
    /// Has an iterator and is reading.
    Reading,
    /// Retrying after an error.
    Retrying,
    /// Read to SHARD_END and every record done.
    Finished,
    /// Stopped by an error a person must look at.
    Failed,
}

#[derive(Debug, Clone)]
pub struct ShardStatus {
    pub state: ShardState,
    pub checkpoint: Option<String>,
    pub millis_behind_latest: Option<i64>,
    pub records_read: u64,
    /// Records the uplink converter turned into messages.
    pub records_converted: u64,
    pub records_failed: u64,
    /// When the checkpoint was last written (epoch ms).
    pub checkpoint_ms: Option<i64>,
    /// User records of KPL aggregates dropped because their hash key is
    /// outside the shard's range.
    pub user_records_dropped: u64,
    pub in_flight: usize,
    pub last_error: Option<String>,
    /// Records read per second, measured over windows of about a second.
    rate: RateWindow,
}

/// Records read per second: updated as reads are counted; a window that
/// has seen no update for a while reads as the rate since it started, so
/// an idle shard decays to 0 without a timer.
#[derive(Debug, Clone, Copy, Default)]
struct RateWindow {
    since: Option<Instant>,
    base: u64,
    last: f64,
}

const RATE_WINDOW: Duration = Duration::from_secs(1);

impl RateWindow {
    fn observe(&mut self, records: u64, now: Instant) {
        match self.since {
            None => {
                self.since = Some(now);
                self.base = records;
            }
            Some(since) if now.duration_since(since) >= RATE_WINDOW => {
                let elapsed = now.duration_since(since).as_secs_f64();
                self.last = records.saturating_sub(self.base) as f64 / elapsed;
                self.since = Some(now);
                self.base = records;
            }
            Some(_) => {}
        }
    }

    fn read(&self, records: u64, now: Instant) -> f64 {
        match self.since {
            Some(since) if now.duration_since(since) >= RATE_WINDOW * 2 => {
                records.saturating_sub(self.base) as f64 / now.duration_since(since).as_secs_f64()
            }
            _ => self.last,
        }
    }
}

impl ShardStatus {
    /// Records read per second lately.
    pub fn records_per_second(&self) -> f64 {
        self.rate.read(self.records_read, Instant::now())
    }
}

impl Default for ShardStatus {
    fn default() -> Self {
        ShardStatus {
            state: ShardState::Starting,
            checkpoint: None,
            millis_behind_latest: None,
            records_read: 0,
            records_converted: 0,
            records_failed: 0,
            checkpoint_ms: None,
            user_records_dropped: 0,
            in_flight: 0,
            last_error: None,
            rate: RateWindow::default(),
        }
    }
}

/// Measurements of parts that are no shard's: converter calls, store
/// commits, downlinks. Process-wide, as these parts are.
#[derive(Default)]
pub struct Totals {
    /// Duration of each JavaScript call (converters and script nodes).
    pub js_call: Histogram,
    /// Duration of each store commit (a batch, with its fsync).
    pub store_commit: Histogram,
    /// Downlink records accepted by PutRecords.
    pub downlinks_sent: AtomicU64,
    /// Downlink messages that could not be sent (routed to Failure).
    pub downlinks_failed: AtomicU64,
}

pub static TOTALS: std::sync::LazyLock<Totals> = std::sync::LazyLock::new(Totals::default);

/// Every shard's status, keyed by (integration, shard), and record
/// latencies.
#[derive(Clone, Default)]
pub struct StatusBoard {
    shards: Arc<Mutex<BTreeMap<(String, String), ShardStatus>>>,
    integrations_pending: Arc<Mutex<BTreeMap<String, String>>>,
    /// From hand-over to the pipeline until the record is done.
    pub handover_latency: Arc<Histogram>,
    /// From the record's ApproximateArrivalTimestamp until it is done.
    pub arrival_latency: Arc<Histogram>,
    /// Records done, all shards.
    pub records_done: Arc<AtomicU64>,
    /// Called with each record's sequence number when it is done (used by
    /// the benchmark to time put-to-stored).
    pub done_observer: Arc<std::sync::OnceLock<DoneObserver>>,
}

/// See [`StatusBoard::done_observer`].
pub type DoneObserver = Box<dyn Fn(&str) + Send + Sync>;

impl StatusBoard {
    pub fn update(&self, integration: &str, shard: &str, f: impl FnOnce(&mut ShardStatus)) {
        let mut shards = self.shards.lock().expect("status lock");
        let status = shards
            .entry((integration.to_string(), shard.to_string()))
            .or_default();
        f(status);
        status.rate.observe(status.records_read, Instant::now());
    }

    /// Forgets a shard (its consumer was stopped for good).
    pub fn remove(&self, integration: &str, shard: &str) {
        self.shards
            .lock()
            .expect("status lock")
            .remove(&(integration.to_string(), shard.to_string()));
    }

    /// Integrations whose shards are not listed yet, with why.
    pub fn pending(&self) -> BTreeMap<String, String> {
        self.integrations_pending
            .lock()
            .expect("status lock")
            .clone()
    }

    /// Marks an integration whose shards are not listed yet, with why.
    pub fn integration_pending(&self, integration: &str, reason: Option<String>) {
        let mut pending = self.integrations_pending.lock().expect("status lock");
        match reason {
            Some(reason) => pending.insert(integration.to_string(), reason),
            None => pending.remove(integration),
        };
    }

    pub fn snapshot(&self) -> Vec<((String, String), ShardStatus)> {
        let shards = self.shards.lock().expect("status lock");
        shards.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Ready when every integration listed its shards and every shard is
    /// reading or finished; otherwise the reasons.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut reasons: Vec<String> = self
            .integrations_pending
            .lock()
            .expect("status lock")
            .iter()
            .map(|(name, why)| format!("integration {name}: {why}"))
            .collect();
        for ((integration, shard), status) in self.snapshot() {
            if !matches!(status.state, ShardState::Reading | ShardState::Finished) {
                reasons.push(format!(
                    "integration {integration} shard {shard}: {:?}{}",
                    status.state,
                    status
                        .last_error
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_per_second_over_a_window_then_decays_when_idle() {
        let start = Instant::now();
        let mut rate = RateWindow::default();
        rate.observe(0, start);
        rate.observe(50, start + Duration::from_millis(500));
        assert_eq!(rate.read(50, start + Duration::from_millis(600)), 0.0);
        rate.observe(100, start + Duration::from_secs(1));
        assert_eq!(rate.read(100, start + Duration::from_millis(1100)), 100.0);
        // Nothing more read: after two windows the rate falls.
        let idle = rate.read(100, start + Duration::from_secs(5));
        assert_eq!(idle, 0.0);
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).unwrap().as_secs_f64() * 1000.0;
        let p99 = h.quantile(0.99).unwrap().as_secs_f64() * 1000.0;
        assert!((45.0..=56.0).contains(&p50), "{p50}");
        assert!((90.0..=110.0).contains(&p99), "{p99}");
    }
}
