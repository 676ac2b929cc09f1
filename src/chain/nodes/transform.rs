//! TbTransformMsgNode: a script returns `{msg, metadata, msgType}` (or an
//! array of those, one message each) and the result goes on `Success`; a
//! throw or a malformed result goes to `Failure`.

use serde_json::Value;

use super::script::{messages_from, NodeScript};
use super::{failure, success, NodeOutput};
use crate::chain::{Envelope, Services};
use crate::convert::ScriptKind;

#[derive(Debug, Clone)]
pub struct Config {
    pub script: NodeScript,
}

impl Config {
    pub fn parse(config: &Value, origin: &str) -> Result<Config, String> {
        Ok(Config {
            script: NodeScript::required(config, ScriptKind::RuleNode("Transform"), origin)?,
        })
    }
}

pub fn process(config: &Config, env: Envelope, services: &Services) -> NodeOutput {
    let script = config.script.clone();
    let js = services.js.clone();
    NodeOutput::Later(Box::pin(async move {
        let result = script.run(&js, &env.msg).await;
        match result.and_then(|value| messages_from(value, &env.msg)) {
            Ok(messages) => messages
                .into_iter()
                .map(|msg| success(env.with_msg(msg)))
                .collect(),
            Err(e) => vec![failure(env, format!("transform script failed: {e}"))],
        }
    }))
}
