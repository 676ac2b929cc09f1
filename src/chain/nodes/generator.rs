//! TbMsgGeneratorNode: every `periodInSeconds` runs its script
//! (`Generate(prevMsg, prevMetadata, prevMsgType)`, which returns
//! `{msg, metadata, msgType}`) and emits the result on `Success`, at most
//! `msgCount` times (0: without end). The originator is the configured
//! device or asset (`originatorType`, `originatorId`), else the tenant.
//! Generated messages are not records of any stream: nothing waits for
//! them, and when a reload replaces the chain the generator stops and the
//! new chain's starts over.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::msg_count::node_ticket;
use super::script::{messages_from, NodeScript};
use super::{success, NodeInfo, NodeOutput};
use crate::chain::{Envelope, RuleSet, Services};
use crate::convert::ScriptKind;
use crate::msg::{EntityId, EntityType, TbMsg};

#[derive(Debug, Clone)]
pub struct Node {
    script: NodeScript,
    period: Duration,
    max_count: u64,
    originator: EntityId,
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    generated: u64,
    previous: TbMsg,
}

impl Node {
    pub fn parse(config: &Value, origin: &str) -> Result<Node, String> {
        let script = NodeScript::required(config, ScriptKind::Generator, origin)?;
        let seconds = match config.get("periodInSeconds") {
            None | Some(Value::Null) => 1,
            Some(v) => v.as_u64().filter(|s| *s > 0).ok_or_else(|| {
                format!("periodInSeconds must be a positive number of seconds, got {v}")
            })?,
        };
        let max_count = match config.get("msgCount") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| format!("msgCount must be a number (0: no limit), got {v}"))?,
        };
        let originator = originator(config)?;
        let previous = TbMsg::new("", originator, Default::default(), "{}".into(), 0);
        Ok(Node {
            script,
            period: Duration::from_secs(seconds),
            max_count,
            originator,
            state: Arc::new(Mutex::new(State {
                generated: 0,
                previous,
            })),
        })
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    pub fn script(&self) -> &NodeScript {
        &self.script
    }

    /// Generates the next message, unless `msgCount` are made.
    pub fn tick(
        &mut self,
        node: &NodeInfo,
        set: Arc<RuleSet>,
        services: &Services,
    ) -> Option<NodeOutput> {
        let previous = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if self.max_count > 0 && state.generated >= self.max_count {
                return None;
            }
            state.previous.clone()
        };
        let script = self.script.clone();
        let js = services.js.clone();
        let state = self.state.clone();
        let originator = self.originator;
        let ticket = node_ticket(node);
        let label = node.label.clone();
        Some(NodeOutput::Later(Box::pin(async move {
            let result = script.run(&js, &previous).await;
            let generated = result.and_then(|value| messages_from(value, &previous));
            let mut messages = match generated {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::error!(node = %label, error = %e, "generator script failed; nothing generated this period");
                    return Vec::new();
                }
            };
            let Some(mut msg) = (!messages.is_empty()).then(|| messages.remove(0)) else {
                return Vec::new();
            };
            msg.originator = originator;
            msg.ts = crate::msg::now_millis();
            {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                state.generated += 1;
                state.previous = msg.clone();
            }
            vec![success(Envelope {
                msg,
                ticket,
                set,
                frames: None,
            })]
        })))
    }
}

fn originator(config: &Value) -> Result<EntityId, String> {
    let id = config
        .get("originatorId")
        .and_then(super::super::loader::id_text);
    let Some(id) = id else {
        return Ok(EntityId::tenant());
    };
    let entity_type = config
        .get("originatorType")
        .and_then(Value::as_str)
        .unwrap_or("DEVICE");
    let entity_type = match EntityType::parse(entity_type) {
        Some(t) => t,
        None => {
            return Err(format!(
                "originatorType {entity_type:?} is not DEVICE, ASSET or TENANT"
            ))
        }
    };
    let id = uuid::Uuid::parse_str(&id)
        .map_err(|e| format!("originatorId {id:?} is not a UUID: {e}"))?;
    Ok(EntityId { entity_type, id })
}
