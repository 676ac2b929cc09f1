//! TbJsSwitchNode: a script returns a relation name or an array of them;
//! the message goes along each (a copy per relation). A throw or any other
//! result goes to `Failure`.

use serde_json::Value;

use super::script::NodeScript;
use super::{failure, NodeOutput};
use crate::chain::{Envelope, Services};
use crate::convert::ScriptKind;

/// The node's script: `function Switch(msg, metadata, msgType)`.
pub fn parse(config: &Value, origin: &str) -> Result<NodeScript, String> {
    NodeScript::required(config, ScriptKind::RuleNode("Switch"), origin)
}

pub fn process(script: &NodeScript, env: Envelope, services: &Services) -> NodeOutput {
    let script = script.clone();
    let js = services.js.clone();
    NodeOutput::Later(Box::pin(async move {
        let relations = match script.run(&js, &env.msg).await {
            Ok(result) => relations(result),
            Err(e) => Err(format!("switch script failed: {e}")),
        };
        match relations {
            Ok(mut relations) => {
                let last = relations.pop();
                let mut out: Vec<_> = relations.into_iter().map(|r| (r, env.copy())).collect();
                if let Some(last) = last {
                    out.push((last, env));
                }
                out
            }
            Err(reason) => vec![failure(env, reason)],
        }
    }))
}

fn relations(result: Value) -> Result<Vec<String>, String> {
    let wrong = |v: &Value| {
        format!("switch script must return a relation name or an array of them, got {v}")
    };
    match result {
        Value::String(name) => Ok(vec![name]),
        Value::Array(items) => {
            let mut names = Vec::new();
            for item in &items {
                match item {
                    Value::String(name) if !names.contains(name) => names.push(name.clone()),
                    Value::String(_) => {}
                    _ => return Err(wrong(&Value::Array(items.clone()))),
                }
            }
            Ok(names)
        }
        other => Err(wrong(&other)),
    }
}
