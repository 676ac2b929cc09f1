//! TbMsgTimeseriesNode: stores a POST_TELEMETRY_REQUEST's values as
//! telemetry history and latest values, then emits Success once committed.
//!
//! The data may be a flat object of values, `{ts, values}`, or an array of
//! those; values without a ts take the `ts` metadata, else the message ts
//! (`useServerTs` takes the time of processing instead). A TTL (the
//! message's `TTL` metadata in seconds, else `defaultTTL`; 0 keeps values
//! forever) makes history values expire that long after their ts; expired
//! values are purged in the background. `skipLatestPersistence` leaves the
//! latest values alone.

use serde_json::Value;

use super::{failure, flag, store_and_emit, NodeCtx, NodeOutput};
use crate::chain::Envelope;
use crate::msg::POST_TELEMETRY_REQUEST;
use crate::store::{KvValue, Write};

#[derive(Debug, Clone)]
pub struct Config {
    /// Seconds to keep history values; 0 keeps them forever.
    pub default_ttl: i64,
    pub use_server_ts: bool,
    pub skip_latest: bool,
}

impl Config {
    pub fn parse(config: &Value) -> Result<Config, String> {
        let default_ttl = match config.get("defaultTTL") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_i64()
                .filter(|ttl| *ttl >= 0)
                .ok_or_else(|| format!("defaultTTL must be a number of seconds, got {v}"))?,
        };
        Ok(Config {
            default_ttl,
            use_server_ts: flag(config, "useServerTs", false)?,
            skip_latest: flag(config, "skipLatestPersistence", false)?,
        })
    }

    /// The TTL of a message's values in milliseconds (0: forever).
    fn ttl_ms(&self, env: &Envelope) -> Result<i64, String> {
        let seconds = match env.msg.metadata.get("TTL") {
            Some(text) => text
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|ttl| *ttl >= 0)
                .ok_or_else(|| format!("TTL metadata {text:?} is not a number of seconds"))?,
            None => self.default_ttl,
        };
        Ok(seconds.saturating_mul(1000))
    }
}

pub fn process(config: &Config, env: Envelope, ctx: &NodeCtx<'_>) -> NodeOutput {
    if env.msg.msg_type != POST_TELEMETRY_REQUEST {
        let reason = format!("unsupported message type {}", env.msg.msg_type);
        return NodeOutput::Now(vec![failure(env, reason)]);
    }
    let default_ts = if config.use_server_ts {
        crate::msg::now_millis()
    } else {
        env.msg
            .metadata
            .get("ts")
            .and_then(|t| t.parse().ok())
            .unwrap_or(env.msg.ts)
    };
    let writes = config
        .ttl_ms(&env)
        .and_then(|ttl_ms| telemetry_writes(&env, default_ts, ttl_ms, config));
    match writes {
        Ok(writes) => store_and_emit(writes, env, ctx, "telemetry"),
        Err(reason) => NodeOutput::Now(vec![failure(env, reason)]),
    }
}

/// The values to store; null (also NaN and infinities, which JSON turns
/// into null) and out-of-range numbers are skipped with a warning.
pub fn stored_values(
    values: &serde_json::Map<String, Value>,
    env: &Envelope,
) -> Vec<(String, KvValue)> {
    let mut stored = Vec::with_capacity(values.len());
    let mut skipped = Vec::new();
    for (key, value) in values {
        match KvValue::from_json(value) {
            Some(value) => stored.push((key.clone(), value)),
            None => skipped.push(key.as_str()),
        }
    }
    if !skipped.is_empty() {
        let source = env.ticket.source();
        tracing::warn!(
            originator = %env.msg.originator,
            integration = %source.integration,
            shard = %source.shard,
            sequence_number = %source.sequence_number,
            keys = %skipped.join(","),
            "values that are null, NaN, infinite or out of range were not stored"
        );
    }
    stored
}

fn telemetry_writes(
    env: &Envelope,
    default_ts: i64,
    ttl_ms: i64,
    config: &Config,
) -> Result<Vec<Write>, String> {
    let data: Value = serde_json::from_str(&env.msg.data)
        .map_err(|e| format!("message data is not JSON: {e}"))?;
    let entries = match data {
        Value::Array(items) => items,
        other => vec![other],
    };
    let mut writes = Vec::new();
    for entry in entries {
        let Value::Object(mut object) = entry else {
            return Err("telemetry must be an object or an array of objects".into());
        };
        let (ts, values) = match (object.get("ts"), object.get("values")) {
            (Some(ts), Some(Value::Object(values))) => {
                let ts = ts.as_i64().ok_or("telemetry ts must be a number")?;
                let ts = if config.use_server_ts { default_ts } else { ts };
                (ts, values.clone())
            }
            _ => (default_ts, std::mem::take(&mut object)),
        };
        if !(0..=crate::convert::uplink::MAX_TS).contains(&ts) {
            return Err(format!(
                "telemetry ts {ts} is not between the epoch and the year 9999"
            ));
        }
        let values = stored_values(&values, env);
        if !values.is_empty() {
            writes.push(Write::Telemetry {
                entity: env.msg.originator,
                ts,
                values,
                expires_ms: (ttl_ms > 0).then(|| ts.saturating_add(ttl_ms)),
                latest: !config.skip_latest,
            });
        }
    }
    Ok(writes)
}
