//! What script nodes share: the script of a node configuration (`jsScript`,
//! or `tbelScript` when `scriptLang` is TBEL), its call on the converter
//! pool with the converters' time and memory limits, and turning a
//! script's `{msg, metadata, msgType}` result into messages.
//!
//! TBEL scripts run on the JavaScript engine; those that parse as
//! JavaScript (most simple ones do) work, the others are rejected when the
//! chain is loaded.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::Addr;
use serde_json::Value;

use crate::convert::{ConverterWorker, RunScript, Script, ScriptKind};
use crate::msg::TbMsg;

/// A node's compiled-once script.
#[derive(Debug, Clone)]
pub struct NodeScript {
    pub script: Arc<Script>,
    /// Written in TBEL (`scriptLang: "TBEL"`).
    pub tbel: bool,
}

impl NodeScript {
    /// The node's script, if its configuration has a non-blank one.
    pub fn parse(
        config: &Value,
        kind: ScriptKind,
        origin: &str,
    ) -> Result<Option<NodeScript>, String> {
        let lang = match config.get("scriptLang") {
            None | Some(Value::Null) => "JS",
            Some(Value::String(lang)) => lang.as_str(),
            Some(other) => {
                return Err(format!(
                    "scriptLang must be \"JS\" or \"TBEL\", got {other}"
                ))
            }
        };
        let tbel = match lang.to_ascii_uppercase().as_str() {
            "JS" => false,
            "TBEL" => true,
            _ => {
                return Err(format!(
                    "scriptLang must be \"JS\" or \"TBEL\", got {lang:?}"
                ))
            }
        };
        let key = if tbel { "tbelScript" } else { "jsScript" };
        let body = match config.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(body)) if body.trim().is_empty() => return Ok(None),
            Some(Value::String(body)) => body.clone(),
            Some(other) => return Err(format!("{key} must be a string, got {other}")),
        };
        let origin = format!("{origin} ({key})");
        Ok(Some(NodeScript {
            script: Script::new(kind, origin, body),
            tbel,
        }))
    }

    /// The node's script; a node of this type cannot do without one.
    pub fn required(config: &Value, kind: ScriptKind, origin: &str) -> Result<NodeScript, String> {
        let key = if config.get("scriptLang").and_then(Value::as_str) == Some("TBEL") {
            "tbelScript"
        } else {
            "jsScript"
        };
        Self::parse(config, kind, origin)?.ok_or_else(|| format!("{key} is missing or empty"))
    }

    /// Runs the script on a message (as `msg`, `metadata`, `msgType`).
    pub async fn run(&self, js: &Addr<ConverterWorker>, msg: &TbMsg) -> Result<Value, String> {
        let job = RunScript {
            script: self.script.clone(),
            data: msg.data.clone(),
            metadata: msg.metadata.clone(),
            msg_type: msg.msg_type.clone(),
        };
        match js.send(job).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("the script pool is not running: {e}")),
        }
    }
}

/// Messages from a script's result: `{msg, metadata, msgType}` or an array
/// of those. A missing part keeps the original message's.
pub fn messages_from(result: Value, original: &TbMsg) -> Result<Vec<TbMsg>, String> {
    let items = match result {
        Value::Array(items) => items,
        Value::Object(_) => vec![result],
        other => {
            return Err(format!(
            "the script must return {{msg, metadata, msgType}} or an array of those, got {other}"
        ))
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| message_from(item, original).map_err(|e| format!("result [{i}]: {e}")))
        .collect()
}

fn message_from(item: Value, original: &TbMsg) -> Result<TbMsg, String> {
    let Value::Object(mut object) = item else {
        return Err("not an object".into());
    };
    let mut msg = original.copy();
    if let Some(data) = object.remove("msg") {
        msg.data = match data {
            Value::String(text) => Value::String(text).to_string(),
            other => other.to_string(),
        };
    }
    match object.remove("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => msg.metadata = string_map(map),
        Some(other) => return Err(format!("metadata must be an object, got {other}")),
    }
    match object.remove("msgType") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if !t.trim().is_empty() => msg.msg_type = t,
        Some(other) => return Err(format!("msgType must be a non-empty string, got {other}")),
    }
    Ok(msg)
}

/// Metadata values are strings in ThingsBoard; others are written as JSON.
pub fn string_map(map: serde_json::Map<String, Value>) -> BTreeMap<String, String> {
    map.into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            (k, text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{EntityId, EntityType};

    fn msg() -> TbMsg {
        let originator = EntityId {
            entity_type: EntityType::Device,
            id: uuid::Uuid::nil(),
        };
        let mut metadata = BTreeMap::new();
        metadata.insert("deviceName".into(), "d".into());
        TbMsg::new(
            "POST_TELEMETRY_REQUEST",
            originator,
            metadata,
            r#"{"t":1}"#.into(),
            5,
        )
    }

    #[test]
    fn a_result_replaces_only_what_it_names() {
        let out = messages_from(serde_json::json!({"msg": {"t": 2}}), &msg()).unwrap();
        assert_eq!(out[0].data, r#"{"t":2}"#);
        assert_eq!(out[0].metadata["deviceName"], "d");
        assert_eq!(out[0].msg_type, "POST_TELEMETRY_REQUEST");

        let out = messages_from(
            serde_json::json!([{"metadata": {"n": 1}, "msgType": "CUSTOM"}, {}]),
            &msg(),
        )
        .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].metadata["n"], "1");
        assert_eq!(out[0].msg_type, "CUSTOM");
        assert_ne!(out[0].id, out[1].id);
    }

    #[test]
    fn a_bad_result_says_what_is_wrong() {
        let err = messages_from(serde_json::json!(42), &msg()).unwrap_err();
        assert!(err.contains("must return"), "{err}");
        let err = messages_from(serde_json::json!([{"metadata": 1}]), &msg()).unwrap_err();
        assert!(err.contains("[0]") && err.contains("metadata"), "{err}");
    }
}
