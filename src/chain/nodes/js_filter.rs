//! TbJsFilterNode: a script returns true or false; the message goes on
//! `True` or `False`, or to `Failure` when the script throws or returns
//! something else.

use serde_json::Value;

use super::script::NodeScript;
use super::{failure, NodeOutput};
use crate::chain::{Envelope, Services};
use crate::convert::ScriptKind;

/// The node's script: `function Filter(msg, metadata, msgType)`.
pub fn parse(config: &Value, origin: &str) -> Result<NodeScript, String> {
    NodeScript::required(config, ScriptKind::RuleNode("Filter"), origin)
}

pub fn process(script: &NodeScript, env: Envelope, services: &Services) -> NodeOutput {
    let script = script.clone();
    let js = services.js.clone();
    NodeOutput::Later(Box::pin(async move {
        match script.run(&js, &env.msg).await {
            Ok(Value::Bool(true)) => vec![("True".to_string(), env)],
            Ok(Value::Bool(false)) => vec![("False".to_string(), env)],
            Ok(other) => vec![failure(
                env,
                format!("filter script must return true or false, got {other}"),
            )],
            Err(e) => vec![failure(env, format!("filter script failed: {e}"))],
        }
    }))
}
