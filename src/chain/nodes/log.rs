//! TbLogNode: logs a message at INFO, as text made by the node's script
//! (`jsScript`, or `tbelScript` when `scriptLang` is TBEL and it parses as
//! JavaScript), or as the message JSON when there is no script.

use std::sync::Arc;

use serde_json::Value;

use super::{failure, success, NodeOutput};
use crate::chain::{Envelope, Services};
use crate::convert::{RunScript, Script, ScriptKind};

#[derive(Debug, Clone)]
pub struct Config {
    pub script: Option<String>,
    compiled: Option<Arc<Script>>,
}

impl Config {
    pub fn parse(config: &Value) -> Result<Config, String> {
        let lang = config
            .get("scriptLang")
            .and_then(Value::as_str)
            .unwrap_or("JS");
        let key = if lang.eq_ignore_ascii_case("TBEL") {
            "tbelScript"
        } else {
            "jsScript"
        };
        let script = config
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string);
        let compiled = script
            .as_ref()
            .map(|body| Script::new(ScriptKind::RuleNode, "log node", body.clone()));
        Ok(Config { script, compiled })
    }
}

pub fn process(config: &Config, env: Envelope, services: &Services, node: &str) -> NodeOutput {
    let node = node.to_string();
    let Some(script) = config.compiled.clone() else {
        let text = serde_json::to_string(&env.msg).unwrap_or_default();
        tracing::info!(node = %node, "{text}");
        return NodeOutput::Now(vec![success(env)]);
    };
    let js = services.js.clone();
    NodeOutput::Later(Box::pin(async move {
        let job = RunScript {
            script,
            data: env.msg.data.clone(),
            metadata: env.msg.metadata.clone(),
            msg_type: env.msg.msg_type.clone(),
        };
        match js.send(job).await {
            Ok(Ok(value)) => {
                let text = match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                tracing::info!(node = %node, "{text}");
                vec![success(env)]
            }
            Ok(Err(e)) => vec![failure(env, format!("log script failed: {e}"))],
            Err(e) => vec![failure(env, format!("script pool unavailable: {e}"))],
        }
    }))
}
