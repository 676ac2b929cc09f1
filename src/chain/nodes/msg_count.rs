//! TbMsgCountNode: counts the messages that reach it and, every
//! `interval` seconds, emits a POST_TELEMETRY_REQUEST from the tenant with
//! `{"<telemetryPrefix>_shardflow": count}` on `Success` (ThingsBoard
//! names the key after its service id). Counted messages end here.

use std::time::Duration;

use serde_json::{json, Value};

use super::{success, NodeInfo, NodeOutput};
use crate::chain::{Envelope, RuleSet};
use crate::delivery::{SourceRecord, Ticket};
use crate::msg::{EntityId, TbMsg};

#[derive(Debug, Clone)]
pub struct Node {
    interval: Duration,
    key: String,
    count: u64,
}

impl Node {
    pub fn parse(config: &Value) -> Result<Node, String> {
        let seconds = match config.get("interval") {
            None | Some(Value::Null) => 1,
            Some(v) => v
                .as_u64()
                .filter(|s| *s > 0)
                .ok_or_else(|| format!("interval must be a positive number of seconds, got {v}"))?,
        };
        let prefix = config
            .get("telemetryPrefix")
            .and_then(Value::as_str)
            .unwrap_or("messageCount");
        Ok(Node {
            interval: Duration::from_secs(seconds),
            key: format!("{prefix}_shardflow"),
            count: 0,
        })
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// A message is counted; it is done.
    pub fn count(&mut self, env: Envelope) -> NodeOutput {
        self.count += 1;
        drop(env);
        NodeOutput::Now(Vec::new())
    }

    /// The count of the interval that ended, as a message.
    pub fn tick(&mut self, node: &NodeInfo, set: std::sync::Arc<RuleSet>) -> Option<NodeOutput> {
        let count = std::mem::take(&mut self.count);
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("delta".to_string(), self.interval.as_millis().to_string());
        let msg = TbMsg::new(
            crate::msg::POST_TELEMETRY_REQUEST,
            EntityId::tenant(),
            metadata,
            json!({ self.key.as_str(): count }).to_string(),
            crate::msg::now_millis(),
        );
        let env = Envelope {
            msg,
            ticket: node_ticket(node),
            set,
            frames: None,
        };
        Some(NodeOutput::Now(vec![success(env)]))
    }
}

/// The ticket of a message a node made itself: nothing waits for it, and
/// a dead letter of it names the node.
pub fn node_ticket(node: &NodeInfo) -> Ticket {
    Ticket::detached(SourceRecord {
        integration: format!("rule node {} of chain {}", node.label, node.chain).into(),
        arrival_ms: crate::msg::now_millis(),
        ..Default::default()
    })
}
