//! TbCheckMessageNode: `True` when the message data has the listed fields
//! and its metadata the listed keys (all of them with `checkAllKeys`, else
//! at least one), `False` otherwise.

use serde_json::Value;

use super::{flag, string_list, NodeOutput};
use crate::chain::Envelope;

#[derive(Debug, Clone)]
pub struct Config {
    pub message_names: Vec<String>,
    pub metadata_names: Vec<String>,
    pub check_all_keys: bool,
}

impl Config {
    pub fn parse(config: &Value) -> Result<Config, String> {
        let parsed = Config {
            message_names: string_list(config, "messageNames")?,
            metadata_names: string_list(config, "metadataNames")?,
            check_all_keys: flag(config, "checkAllKeys", true)?,
        };
        if parsed.message_names.is_empty() && parsed.metadata_names.is_empty() {
            return Err("messageNames and metadataNames are both empty: nothing to check".into());
        }
        Ok(parsed)
    }
}

pub fn process(config: &Config, env: Envelope) -> NodeOutput {
    let data: Value = serde_json::from_str(&env.msg.data).unwrap_or(Value::Null);
    let in_data = config.message_names.iter().map(|k| data.get(k).is_some());
    let in_metadata = config
        .metadata_names
        .iter()
        .map(|k| env.msg.metadata.contains_key(k));
    let mut found = in_data.chain(in_metadata);
    let passed = if config.check_all_keys {
        found.all(|f| f)
    } else {
        found.any(|f| f)
    };
    let relation = if passed { "True" } else { "False" };
    NodeOutput::Now(vec![(relation.to_string(), env)])
}
