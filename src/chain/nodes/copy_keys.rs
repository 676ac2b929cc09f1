//! TbCopyKeysNode: copies keys matching the `keys` patterns (regular
//! expressions) from the metadata into the data (`copyFrom: METADATA`, or
//! the older `fromMetadata: true`), or from the data into the metadata.

use serde_json::Value;

use super::{data_object, failure, success, KeySelection, MessageSide, NodeOutput};
use crate::chain::Envelope;

pub fn process(config: &KeySelection, mut env: Envelope) -> NodeOutput {
    let mut data = match data_object(&env) {
        Ok(data) => data,
        Err(reason) => return NodeOutput::Now(vec![failure(env, reason)]),
    };
    match config.side {
        MessageSide::Metadata => {
            for (key, value) in &env.msg.metadata {
                if config.matches(key) {
                    data.insert(key.clone(), Value::String(value.clone()));
                }
            }
            env.msg.data = Value::Object(data).to_string();
        }
        MessageSide::Data => {
            for (key, value) in data {
                if config.matches(&key) {
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
