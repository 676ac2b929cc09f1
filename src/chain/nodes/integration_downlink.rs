//! TbIntegrationDownlinkNode: encodes a message with the integration's
//! downlink converter (the one of the message's rule set) and puts the
//! result on Kinesis. Success once every record was accepted by
//! PutRecords; Failure with the reason otherwise.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde_json::Value;

use super::{failure, success, NodeOutput};
use crate::chain::{Envelope, Services};
use crate::convert::Encode;

#[derive(Debug, Clone)]
pub struct Config {
    /// The integration's name or id; empty means "the only one".
    pub integration: String,
}

impl Config {
    pub fn parse(config: &Value) -> Result<Config, String> {
        let integration = match config.get("integrationId") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            // ThingsBoard may export the id as {entityType, id}.
            Some(Value::Object(o)) => o
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            Some(other) => return Err(format!("integrationId must be a string, got {other}")),
        };
        Ok(Config { integration })
    }
}

pub fn process(config: &Config, env: Envelope, services: &Services) -> NodeOutput {
    let (integration, path) = match services.downlink(&config.integration, &env.set) {
        Ok(found) => found,
        Err(reason) => return NodeOutput::Now(vec![failure(env, reason)]),
    };
    let js = services.js.clone();
    NodeOutput::Later(Box::pin(async move {
        let mut integration_metadata = BTreeMap::new();
        integration_metadata.insert("integrationName".to_string(), integration);
        let job = Encode {
            script: path.encoder.clone(),
            data: env.msg.data.clone(),
            metadata: env.msg.metadata.clone(),
            msg_type: env.msg.msg_type.clone(),
            integration_metadata,
        };
        let records = match js.send(job).await {
            Ok(Ok(records)) => records,
            Ok(Err(e)) => {
                crate::status::TOTALS
                    .downlinks_failed
                    .fetch_add(1, Ordering::Relaxed);
                return vec![failure(env, format!("downlink converter failed: {e}"))];
            }
            Err(e) => return vec![failure(env, format!("converter pool unavailable: {e}"))],
        };
        let count = records.len() as u64;
        let totals = &crate::status::TOTALS;
        match path.sender.send(records).await {
            Ok(()) => {
                totals.downlinks_sent.fetch_add(count, Ordering::Relaxed);
                vec![success(env)]
            }
            Err(e) => {
                totals.downlinks_failed.fetch_add(1, Ordering::Relaxed);
                vec![failure(env, format!("downlink not sent: {e}"))]
            }
        }
    }))
}
