//! TbRenameKeysNode: renames keys of the message data or metadata
//! (`renameKeysMapping` old -> new; `renameIn` DATA or METADATA, or the
//! older `fromMetadata`). Keys that are absent are left alone.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{data_object, failure, message_side, success, MessageSide, NodeOutput};
use crate::chain::Envelope;

#[derive(Debug, Clone)]
pub struct Config {
    pub side: MessageSide,
    pub mapping: BTreeMap<String, String>,
}

impl Config {
    pub fn parse(config: &Value, version: u32) -> Result<Config, String> {
        let side = message_side(config, "renameIn", version)?;
        let mapping = match config.get("renameKeysMapping") {
            Some(Value::Object(map)) => map
                .iter()
                .map(|(from, to)| match to.as_str() {
                    Some(to) if !to.trim().is_empty() => Ok((from.clone(), to.to_string())),
                    _ => Err(format!(
                        "renameKeysMapping: {from:?} must map to a non-empty key name"
                    )),
                })
                .collect::<Result<_, String>>()?,
            None | Some(Value::Null) => return Err("renameKeysMapping is missing".into()),
            Some(other) => return Err(format!("renameKeysMapping must be an object, got {other}")),
        };
        Ok(Config { side, mapping })
    }
}

pub fn process(config: &Config, mut env: Envelope) -> NodeOutput {
    match config.side {
        MessageSide::Metadata => {
            for (from, to) in &config.mapping {
                if let Some(value) = env.msg.metadata.remove(from) {
                    env.msg.metadata.insert(to.clone(), value);
                }
            }
        }
        MessageSide::Data => {
            let mut data = match data_object(&env) {
                Ok(data) => data,
                Err(reason) => return NodeOutput::Now(vec![failure(env, reason)]),
            };
            for (from, to) in &config.mapping {
                if let Some(value) = data.remove(from) {
                    data.insert(to.clone(), value);
                }
            }
            env.msg.data = Value::Object(data).to_string();
        }
    }
    NodeOutput::Now(vec![success(env)])
}
