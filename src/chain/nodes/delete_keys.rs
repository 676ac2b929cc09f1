//! TbDeleteKeysNode: deletes keys matching the `keys` patterns (regular
//! expressions) from the message data or metadata (`deleteFrom`, or the
//! older `fromMetadata`).

use serde_json::Value;

use super::{data_object, failure, success, KeySelection, MessageSide, NodeOutput};
use crate::chain::Envelope;

pub fn process(config: &KeySelection, mut env: Envelope) -> NodeOutput {
    match config.side {
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
