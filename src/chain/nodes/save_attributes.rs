//! TbMsgAttributesNode: stores a POST_ATTRIBUTES_REQUEST's values as
//! attributes of the configured scope, then emits Success once committed.

use serde_json::Value;

use super::{failure, store_and_emit, NodeCtx, NodeOutput};
use crate::chain::Envelope;
use crate::msg::{now_millis, POST_ATTRIBUTES_REQUEST};
use crate::store::{Scope, Write};

#[derive(Debug, Clone)]
pub struct Config {
    pub scope: Scope,
}

impl Config {
    pub fn parse(config: &Value) -> Result<Config, String> {
        let scope = match config.get("scope").and_then(Value::as_str) {
            None => Scope::Server,
            Some(text) => Scope::parse(text).ok_or_else(|| {
                format!("scope {text:?} is not one of CLIENT_SCOPE, SERVER_SCOPE, SHARED_SCOPE")
            })?,
        };
        Ok(Config { scope })
    }
}

pub fn process(config: &Config, env: Envelope, ctx: &NodeCtx<'_>) -> NodeOutput {
    if env.msg.msg_type != POST_ATTRIBUTES_REQUEST {
        let reason = format!("unsupported message type {}", env.msg.msg_type);
        return NodeOutput::Now(vec![failure(env, reason)]);
    }
    let values = match serde_json::from_str::<Value>(&env.msg.data) {
        Ok(Value::Object(map)) => super::save_timeseries::stored_values(&map, &env),
        Ok(_) => return NodeOutput::Now(vec![failure(env, "attributes must be a JSON object")]),
        Err(e) => {
            let reason = format!("message data is not JSON: {e}");
            return NodeOutput::Now(vec![failure(env, reason)]);
        }
    };
    let write = Write::Attributes {
        entity: env.msg.originator,
        scope: config.scope,
        ts: now_millis(),
        values,
    };
    store_and_emit(vec![write], env, ctx, "attributes")
}
