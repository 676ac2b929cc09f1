//! TbCopyKeysNode: copies keys matching the `keys` patterns (regular
//! expressions) from the metadata into the data (`copyFrom: METADATA`, or
//! the older `fromMetadata: true`), or from the data into the metadata.

use serde_json::Value;

use super::{
    data_object, failure, key_patterns, message_side, string_list, success, MessageSide, NodeOutput,
};
use crate::chain::Envelope;

#[derive(Debug, Clone)]
pub struct Config {
    pub from: MessageSide,
    pub keys: Vec<regex::Regex>,
}

impl Config {
    pub fn parse(config: &Value, version: u32) -> Result<Config, String> {
        let keys = string_list(config, "keys")?;
        if keys.is_empty() {
            return Err("keys is empty: nothing to copy".into());
        }
        Ok(Config {
            from: message_side(config, "copyFrom", version)?,
            keys: key_patterns(&keys)?,
        })
    }

    fn wanted(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k.is_match(key))
    }
}

pub fn process(config: &Config, mut env: Envelope) -> NodeOutput {
    let mut data = match data_object(&env) {
        Ok(data) => data,
        Err(reason) => return NodeOutput::Now(vec![failure(env, reason)]),
    };
    match config.from {
        MessageSide::Metadata => {
            for (key, value) in &env.msg.metadata {
                if config.wanted(key) {
                    data.insert(key.clone(), Value::String(value.clone()));
                }
            }
            env.msg.data = Value::Object(data).to_string();
        }
        MessageSide::Data => {
            for (key, value) in data {
                if config.wanted(&key) {
                    let text = match value {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    env.msg.metadata.insert(key, text);
                }
            }
        }
    }
    NodeOutput::Now(vec![success(env)])
}
