//! The Kinesis side: shard discovery, one consumer actor per shard, and the
//! downlink producer. It feeds the rule engine and knows nothing of HTTP.

pub mod client;
pub mod consumer;
pub mod producer;
pub mod reader;
pub mod window;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use aws_sdk_kinesis::types::Shard;
use aws_sdk_kinesis::Client;

use crate::chain::RuleEngine;
use crate::config::{InitialPosition, IntegrationConfig, PipelineConfig};
use crate::convert::{ConverterWorker, Script};
use crate::status::StatusBoard;
use crate::store::{Store, Write};
use consumer::{describe, Drain, ShardConsumer};
use reader::ShardReader;

/// An integration's shared runtime parts.
pub struct Integration {
    pub config: IntegrationConfig,
    pub pipeline: PipelineConfig,
    pub reader: Arc<dyn ShardReader>,
    pub decoder: Arc<Script>,
    pub js: Addr<ConverterWorker>,
    pub store: Store,
    pub engine: RuleEngine,
    pub status: StatusBoard,
    /// The in-flight bound shared by every shard of every integration.
    pub budget: Arc<window::Budget>,
}

impl Integration {
    pub fn decoder(&self) -> Arc<Script> {
        self.decoder.clone()
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
    }
}

/// Lists the stream's shards (retrying until the stream is reachable) and
/// starts a consumer for each shard that is not finished.
pub fn start(integration: Arc<Integration>, arbiters: Vec<ArbiterHandle>, consumers: Consumers) {
    actix::spawn(async move {
        let shards = list_until_found(&integration).await;
        let initial = match check_stream_identity(&integration).await {
            StreamIdentity::Recreated => InitialPosition::TrimHorizon,
            StreamIdentity::Same => integration.config.initial_position,
        };
        let mut started = 0usize;
        for id in shards {
            let checkpoint = {
                let store = integration.store.clone();
                let (app, stream, shard_id) = (
                    integration.config.application_name.clone(),
                    integration.config.stream_name.clone(),
                    id.clone(),
                );
                actix_rt::task::spawn_blocking(move || store.checkpoint(&app, &stream, &shard_id))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten()
            };
            if checkpoint.as_ref().is_some_and(|c| c.shard_end) {
                tracing::info!(integration = %integration.config.name, shard = %id, "shard already finished; skipped");
                continue;
            }
            // Listed as starting before the actor runs, so /ready waits for it.
            integration
                .status
                .update(&integration.config.name, &id, |_| {});
            let integration = integration.clone();
            let arbiter = &arbiters[started % arbiters.len()];
            started += 1;
            let addr = ShardConsumer::start_in_arbiter(arbiter, move |_| {
                ShardConsumer::new(
                    integration,
                    id,
                    checkpoint.and_then(|c| c.sequence_number),
                    initial,
                )
            });
            consumers.0.lock().expect("consumers lock").push(addr);
        }
        integration
            .status
            .integration_pending(&integration.config.name, None);
    });
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
async fn check_stream_identity(integration: &Integration) -> StreamIdentity {
    let config = &integration.config;
    let created = match integration.reader.created_ms(&config.stream_name).await {
        Ok(Some(created)) => created,
        Ok(None) => return StreamIdentity::Same,
        Err((code, message)) => {
            tracing::warn!(integration = %config.name, stream = %config.stream_name,
                error = %format!("{code}: {message}"),
                "cannot tell when the stream was created; keeping its checkpoints");
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

async fn list_until_found(integration: &Integration) -> Vec<String> {
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
