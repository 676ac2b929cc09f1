//! What each shard consumer is doing, for `/ready`, `/metrics` and logs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
    pub records_failed: u64,
    pub in_flight: usize,
    pub last_error: Option<String>,
}

impl Default for ShardStatus {
    fn default() -> Self {
        ShardStatus {
            state: ShardState::Starting,
            checkpoint: None,
            millis_behind_latest: None,
            records_read: 0,
            records_failed: 0,
            in_flight: 0,
            last_error: None,
        }
    }
}

/// Every shard's status, keyed by (integration, shard).
#[derive(Clone, Default)]
pub struct StatusBoard {
    shards: Arc<Mutex<BTreeMap<(String, String), ShardStatus>>>,
    integrations_pending: Arc<Mutex<BTreeMap<String, String>>>,
}

impl StatusBoard {
    pub fn update(&self, integration: &str, shard: &str, f: impl FnOnce(&mut ShardStatus)) {
        let mut shards = self.shards.lock().expect("status lock");
        f(shards
            .entry((integration.to_string(), shard.to_string()))
            .or_default());
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
