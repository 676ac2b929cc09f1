//! shardflow: AWS Kinesis shards -> JavaScript uplink converters ->
//! ThingsBoard-style rule chains (one actix actor per rule node) -> SQLite,
//! with downlinks back to Kinesis.
//!
//! The pipeline, edge to core:
//! - [`kinesis`]: shard consumers and the downlink producer;
//! - [`convert`]: JavaScript converters on a worker pool;
//! - [`ingest`]: converted records become rule-engine messages;
//! - [`chain`]: rule chains, one actor per node;
//! - [`store`]: devices, telemetry, attributes, checkpoints, dead letters;
//! - [`api`]: ThingsBoard's REST subset;
//! - [`msg`] and [`delivery`]: the message and its delivery ticket, shared
//!   by everything.

pub mod api;
pub mod bench;
pub mod chain;
pub mod cli;
pub mod config;
pub mod convert;
pub mod dead_letters;
pub mod delivery;
pub mod ingest;
pub mod kinesis;
pub mod log_budget;
pub mod msg;
pub mod outbox;
pub mod replay;
pub mod service;
pub mod status;
pub mod store;
