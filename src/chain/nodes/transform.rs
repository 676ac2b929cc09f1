//! TbTransformMsgNode: a script returns `{msg, metadata, msgType}` (or an
//! array of those, one message each) and the result goes on `Success`; a
//! throw or a malformed result goes to `Failure`.

use serde_json::Value;

use super::script::{messages_from, NodeScript};
use super::{failure, success, NodeOutput};
use crate::chain::{Envelope, Services};
use crate::convert::ScriptKind;

/// The node's script: `function Transform(msg, metadata, msgType)`.
pub fn parse(config: &Value, origin: &str) -> Result<NodeScript, String> {
    NodeScript::required(config, ScriptKind::RuleNode("Transform"), origin)
}

pub fn process(script: &NodeScript, env: Envelope, services: &Services) -> NodeOutput {
    let script = script.clone();
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
