//! TbDeleteKeysNode: deletes keys matching the `keys` patterns (regular
//! expressions) from the message data or metadata (`deleteFrom`, or the
//! older `fromMetadata`).

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
            return Err("keys is empty: nothing to delete".into());
        }
        Ok(Config {
            from: message_side(config, "deleteFrom", version)?,
            keys: key_patterns(&keys)?,
        })
    }

    fn matches(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k.is_match(key))
    }
}

pub fn process(config: &Config, mut env: Envelope) -> NodeOutput {
    match config.from {
        MessageSide::Metadata => env.msg.metadata.retain(|k, _| !config.matches(k)),
        MessageSide::Data => {
            let mut data = match data_object(&env) {
                Ok(data) => data,
                Err(reason) => return NodeOutput::Now(vec![failure(env, reason)]),
            };
            data.retain(|k, _| !config.matches(k));
            env.msg.data = Value::Object(data).to_string();
        }
    }
    NodeOutput::Now(vec![success(env)])
}
