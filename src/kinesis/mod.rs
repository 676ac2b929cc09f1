//! The Kinesis side: shard discovery, one consumer actor per shard (reading
//! by polling GetRecords or by enhanced fan-out), KPL de-aggregation, and
//! the downlink producer. It feeds the rule engine and knows nothing of
//! HTTP.

pub mod client;
pub mod consumer;
pub mod fan_out;
pub mod kpl;
pub mod producer;
pub mod reader;
pub mod window;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use aws_sdk_kinesis::types::Shard;
use aws_sdk_kinesis::Client;

use crate::chain::{RuleSet, Rules};
use crate::config::{InitialPosition, IntegrationConfig, PipelineConfig};
use crate::convert::{ConverterWorker, Script};
use crate::status::StatusBoard;
use crate::store::{Store, Write};
use consumer::{describe, Drain, ShardConsumer, Start};
use reader::{KinesisReader, ShardInfo, ShardReader};

/// The shard reader of an integration: GetRecords polling, or enhanced
/// fan-out (SubscribeToShard) with `use_enhanced_fan_out`.
pub fn reader_for(
    config: &IntegrationConfig,
    client: &Client,
    io: &tokio::runtime::Handle,
) -> Arc<dyn ShardReader> {
    let polling = Arc::new(KinesisReader {
        client: client.clone(),
        io: io.clone(),
    });
    if !config.use_enhanced_fan_out {
        return polling;
    }
    let api = Arc::new(fan_out::SdkFanOut {
        client: client.clone(),
        integration: config.name.clone(),
    });
    Arc::new(fan_out::FanOutReader::new(
        polling,
        api,
        &config.stream_name,
        &config.application_name,
        &config.name,
        io.clone(),
    ))
}

/// An integration's shared runtime parts.
pub struct Integration {
    pub config: IntegrationConfig,
    pub pipeline: PipelineConfig,
    pub reader: Arc<dyn ShardReader>,
    pub js: Addr<ConverterWorker>,
    pub store: Store,
    /// The running rule sets: chains and converters, hot-reloaded.
    pub rules: Arc<Rules>,
    pub status: StatusBoard,
    /// The in-flight bound shared by every shard of every integration.
    pub budget: Arc<window::Budget>,
    /// Woken when one of the integration's shards is finished, so that its
    /// children start without waiting for the next listing.
    pub shard_finished: Arc<tokio::sync::Notify>,
}

impl Integration {
    /// The rule set new records enter with, and its uplink converter for
    /// this integration.
    pub fn decoder(&self) -> (Arc<RuleSet>, Arc<Script>) {
        let set = self.rules.current();
        let decoder = set
            .decoders
            .get(&self.config.name)
            .cloned()
            .expect("every set has a decoder for every integration");
        (set, decoder)
    }
}

/// The consumers of a started integration.
#[derive(Clone, Default)]
pub struct Consumers(Arc<Mutex<Vec<Addr<ShardConsumer>>>>);

impl Consumers {
    /// Stops every consumer and waits (up to `limit`) until the records it
    /// fetched are done and its checkpoint is written.
    pub async fn drain(&self, limit: Duration) {
        let consumers: Vec<_> = self.0.lock().expect("consumers lock").clone();
        let waits = consumers.iter().map(|c| c.send(Drain));
        if tokio::time::timeout(limit, futures::future::join_all(waits))
            .await
            .is_err()
        {
            tracing::warn!(
                "records still in flight after {limit:?}; they will be read again after restart"
            );
        }
        for consumer in &consumers {
            consumer.do_send(consumer::Stop);
        }
    }
}

/// Lists the stream's shards (retrying until the stream is reachable) and
/// keeps a consumer running for each shard that is not finished, listing
/// them again periodically (and whenever a shard finishes) to pick up the
/// shards a split or merge creates. A shard made by a split or merge is
/// read only once its parents are read to SHARD_END and their records are
/// done, from TRIM_HORIZON, so records of one partition key keep their
/// order across a reshard. A parent that has expired from the stream (no
/// longer listed) does not hold its children back.
pub fn start(integration: Arc<Integration>, arbiters: Vec<ArbiterHandle>, consumers: Consumers) {
    actix::spawn(async move {
        let mut shards = list_until_found(&integration).await;
        let initial = match check_stream_identity(&integration, true).await {
            StreamIdentity::Recreated => InitialPosition::TrimHorizon,
            StreamIdentity::Same => integration.config.initial_position,
        };
        let retention_ms = retention_ms(&integration).await;
        let mut supervisor = ShardSupervisor {
            integration: integration.clone(),
            arbiters,
            consumers,
            initial,
            retention_ms,
            started: HashSet::new(),
            running: HashMap::new(),
        };
        let interval = Duration::from_millis(integration.pipeline.shard_sync_interval_ms);
        // After a failed listing the next one waits longer, up to a minute.
        let mut wait = interval;
        loop {
            supervisor.start_ready(&shards).await;
            integration
                .status
                .integration_pending(&integration.config.name, None);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = integration.shard_finished.notified() => {}
            }
            match integration
                .reader
                .shards(&integration.config.stream_name)
                .await
            {
                Ok(listed) => {
                    shards = listed;
                    wait = interval;
                    // A stream deleted and created again between two
                    // listings looks the same by its shards: its creation
                    // time tells (one DescribeStreamSummary per listing).
                    supervisor.check_identity(&shards).await;
                }
                Err((code, message)) => {
                    wait = (wait * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                    tracing::warn!(
                        integration = %integration.config.name, stream = %integration.config.stream_name,
                        error = %format!("{code}: {message}"), retry_in_ms = wait.as_millis() as u64,
                        "cannot list shards; trying again later"
                    );
                }
            }
        }
    });
}

struct ShardSupervisor {
    integration: Arc<Integration>,
    arbiters: Vec<ArbiterHandle>,
    consumers: Consumers,
    initial: InitialPosition,
    retention_ms: Option<i64>,
    started: HashSet<String>,
    /// The consumer of each started shard.
    running: HashMap<String, Addr<ShardConsumer>>,
}

impl ShardSupervisor {
    /// After each listing: if the stream is a new one under the same name
    /// (deleted and created again), its checkpoints are dropped (by the
    /// identity check); consumers of shards it also has start them afresh
    /// from TRIM_HORIZON, consumers of shards it does not have stop, and
    /// shards that had finished are started again when it lists them.
    async fn check_identity(&mut self, listed: &[ShardInfo]) {
        let StreamIdentity::Recreated = check_stream_identity(&self.integration, false).await
        else {
            return;
        };
        self.initial = InitialPosition::TrimHorizon;
        let name = &self.integration.config.name;
        for (shard, consumer) in &self.running {
            if listed.iter().any(|s| &s.id == shard) {
                consumer.do_send(consumer::StreamRecreated);
            } else if consumer.connected() {
                tracing::warn!(integration = %name, shard = %shard,
                    "the stream was created again without this shard; its consumer stops");
                consumer.do_send(consumer::Stop);
                self.integration.status.remove(name, shard);
            }
        }
        let running = &self.running;
        self.started.retain(|id| {
            listed.iter().any(|s| &s.id == id) && running.get(id).is_some_and(Addr::connected)
        });
        self.running.retain(|id, _| self.started.contains(id));
    }

    async fn checkpoint(&self, shard: &str) -> Option<crate::store::Checkpoint> {
        let store = self.integration.store.clone();
        let config = &self.integration.config;
        let (app, stream, shard) = (
            config.application_name.clone(),
            config.stream_name.clone(),
            shard.to_string(),
        );
        actix_rt::task::spawn_blocking(move || store.checkpoint(&app, &stream, &shard))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    }

    /// Starts a consumer for every listed shard that is not started, not
    /// finished, and whose parents are done.
    async fn start_ready(&mut self, shards: &[ShardInfo]) {
        let listed: HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
        for shard in shards {
            if self.started.contains(&shard.id) {
                continue;
            }
            let checkpoint = self.checkpoint(&shard.id).await;
            if checkpoint.as_ref().is_some_and(|c| c.shard_end) {
                tracing::debug!(integration = %self.integration.config.name, shard = %shard.id, "shard already finished");
                self.started.insert(shard.id.clone());
                continue;
            }
            let mut waiting_for = None;
            for parent in &shard.parents {
                let done = !listed.contains(parent.as_str())
                    || self.checkpoint(parent).await.is_some_and(|c| c.shard_end);
                if !done {
                    waiting_for = Some(parent.clone());
                    break;
                }
            }
            if let Some(parent) = waiting_for {
                tracing::debug!(integration = %self.integration.config.name, shard = %shard.id,
                    parent = %parent, "shard waits for its parent to finish");
                continue;
            }
            let initial = if !shard.parents.is_empty() {
                InitialPosition::TrimHorizon
            } else {
                self.latest_resolved(&shard.id, checkpoint.as_ref()).await
            };
            // Spread evenly over the call interval whatever the number of
            // shards: the fractional parts of multiples of the golden ratio.
            let phase = (self.started.len() as f64 * 0.618_033_988_75).fract();
            let start = Start {
                checkpoint: checkpoint.filter(|c| c.sequence_number.is_some()),
                initial,
                hash_range: shard.hash_range,
                retention_ms: self.retention_ms,
                phase,
            };
            self.spawn(shard.id.clone(), start);
        }
    }

    /// LATEST is a moving target: the first time a shard starts there, the
    /// time is recorded before its iterator is taken, and a restart before
    /// its first checkpoint resumes AT_TIMESTAMP of that time, so records
    /// that arrived meanwhile are not skipped.
    async fn latest_resolved(
        &self,
        shard: &str,
        checkpoint: Option<&crate::store::Checkpoint>,
    ) -> InitialPosition {
        if self.initial != InitialPosition::Latest {
            return self.initial;
        }
        if let Some(from) = checkpoint.and_then(|c| c.latest_from_ms) {
            return InitialPosition::AtTimestamp(from);
        }
        let config = &self.integration.config;
        let write = Write::LatestFrom {
            application: config.application_name.clone(),
            stream: config.stream_name.clone(),
            shard: shard.to_string(),
            from_ms: crate::msg::now_millis(),
        };
        if let Err(e) = self.integration.store.write(vec![write], None).await {
            tracing::error!(integration = %config.name, shard, error = %e, "LATEST start time not stored");
        }
        InitialPosition::Latest
    }

    fn spawn(&mut self, id: String, start: Start) {
        // Listed as starting before the actor runs, so /ready waits for it.
        self.integration
            .status
            .update(&self.integration.config.name, &id, |_| {});
        let integration = self.integration.clone();
        let arbiter = &self.arbiters[self.started.len() % self.arbiters.len()];
        self.started.insert(id.clone());
        let shard = id.clone();
        let addr = ShardConsumer::start_in_arbiter(arbiter, move |_| {
            ShardConsumer::new(integration, id, start)
        });
        self.running.insert(shard, addr.clone());
        self.consumers.0.lock().expect("consumers lock").push(addr);
    }
}

enum StreamIdentity {
    Same,
    Recreated,
}

/// Compares the stream's creation time with the one its checkpoints were
/// taken on. A stream deleted and created again keeps its name and ARN,
/// but its sequence numbers start over: old checkpoints would skip its
/// records (or be refused), so they are dropped and the new stream is read
/// from TRIM_HORIZON.
async fn check_stream_identity(integration: &Integration, at_start: bool) -> StreamIdentity {
    let config = &integration.config;
    let created = match integration.reader.created_ms(&config.stream_name).await {
        Ok(Some(created)) => created,
        Ok(None) => return StreamIdentity::Same,
        Err((code, message)) if at_start => {
            tracing::warn!(integration = %config.name, stream = %config.stream_name,
                error = %format!("{code}: {message}"),
                "cannot tell when the stream was created; keeping its checkpoints");
            return StreamIdentity::Same;
        }
        Err((code, message)) => {
            tracing::debug!(integration = %config.name, stream = %config.stream_name,
                error = %format!("{code}: {message}"), "cannot tell when the stream was created");
            return StreamIdentity::Same;
        }
    };
    let store = integration.store.clone();
    let (app, stream) = (config.application_name.clone(), config.stream_name.clone());
    let known = actix_rt::task::spawn_blocking(move || store.stream_created_ms(&app, &stream))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    let recreated = known.is_some_and(|known| known != created);
    if recreated {
        tracing::warn!(
            integration = %config.name, stream = %config.stream_name,
            checkpoints_from_ms = ?known, stream_created_ms = created,
            "the stream was deleted and created again since the checkpoints were taken; they are dropped and the new stream is read from TRIM_HORIZON"
        );
    }
    if known != Some(created) {
        let write = Write::StreamIdentity {
            application: config.application_name.clone(),
            stream: config.stream_name.clone(),
            created_ms: created,
            forget_checkpoints: recreated,
        };
        if let Err(e) = integration.store.write(vec![write], None).await {
            tracing::error!(integration = %config.name, error = %e, "stream identity not stored");
        }
    }
    if recreated {
        StreamIdentity::Recreated
    } else {
        StreamIdentity::Same
    }
}

/// The stream's retention period, to tell checkpoints whose next records
/// may have expired; `None` (no such check) when it cannot be read.
async fn retention_ms(integration: &Integration) -> Option<i64> {
    let config = &integration.config;
    match integration
        .reader
        .retention_hours(&config.stream_name)
        .await
    {
        Ok(hours) => hours.map(|h| h * 3_600_000),
        Err((code, message)) => {
            tracing::warn!(integration = %config.name, stream = %config.stream_name,
                error = %format!("{code}: {message}"),
                "cannot read the stream's retention period; checkpoints older than it will not be told");
            None
        }
    }
}

async fn list_until_found(integration: &Integration) -> Vec<ShardInfo> {
    let config = &integration.config;
    let mut pause = Duration::from_secs(1);
    loop {
        match integration.reader.shards(&config.stream_name).await {
            Ok(shards) => {
                tracing::info!(
                    integration = %config.name, stream = %config.stream_name, shards = shards.len(),
                    "stream found"
                );
                return shards;
            }
            Err((code, message)) => {
                let reason = if code == "ResourceNotFoundException" {
                    format!(
                        "stream {:?} not found in region {} ({message}); create it or fix stream_name/region",
                        config.stream_name, config.region
                    )
                } else {
                    format!(
                        "cannot list the shards of stream {:?} in region {}: {code}: {message}",
                        config.stream_name, config.region
                    )
                };
                tracing::error!(integration = %config.name, stream = %config.stream_name,
                    retry_in_s = pause.as_secs(), "{reason}");
                integration
                    .status
                    .integration_pending(&config.name, Some(reason));
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Every shard of a stream, following ListShards pagination.
pub async fn list_shards(client: &Client, stream: &str) -> Result<Vec<Shard>, (String, String)> {
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let request = match &token {
            // With a token, ListShards takes no stream name.
            Some(token) => client.list_shards().next_token(token),
            None => client.list_shards().stream_name(stream),
        };
        let output = request.send().await.map_err(|e| describe(&e))?;
        shards.extend(output.shards().iter().cloned());
        match output.next_token() {
            Some(next) => token = Some(next.to_string()),
            None => return Ok(shards),
        }
    }
}
