//! TbLogNode: logs a message at INFO, as text made by the node's script,
//! or as the message JSON when there is no script.

use serde_json::Value;

use super::script::NodeScript;
use super::{failure, success, NodeOutput};
use crate::chain::{Envelope, Services};
use crate::convert::ScriptKind;

#[derive(Debug, Clone)]
pub struct Config {
    pub script: Option<NodeScript>,
}

impl Config {
    pub fn parse(config: &Value, origin: &str) -> Result<Config, String> {
        Ok(Config {
            script: NodeScript::parse(config, ScriptKind::RuleNode("ToString"), origin)?,
        })
    }
}

pub fn process(config: &Config, env: Envelope, services: &Services, node: &str) -> NodeOutput {
    let node = node.to_string();
    let Some(script) = config.script.clone() else {
        let text = serde_json::to_string(&env.msg).unwrap_or_default();
        tracing::info!(node = %node, "{text}");
        return NodeOutput::Now(vec![success(env)]);
    };
    let js = services.js.clone();
    NodeOutput::Later(Box::pin(async move {
        match script.run(&js, &env.msg).await {
            Ok(value) => {
                let text = match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                tracing::info!(node = %node, "{text}");
                vec![success(env)]
            }
            Err(e) => vec![failure(env, format!("log script failed: {e}"))],
        }
    }))
}
