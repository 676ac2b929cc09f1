//! Rule node types: configuration parsing, the relations each emits, and
//! what each does to a message.
//!
//! Node types are ThingsBoard's class names. A node turns one message into
//! zero or more `(relation, message)` outputs, either at once or after some
//! asynchronous work (a store commit, a script call, a PutRecords).

mod integration_downlink;
mod log;
mod msg_type_switch;
mod save_attributes;
mod save_timeseries;

use futures::future::BoxFuture;
use serde_json::Value;

use super::{Envelope, Services};
use crate::msg::relation;

/// A node's type and validated configuration.
#[derive(Debug, Clone)]
pub enum NodeKind {
    MsgTypeSwitch,
    SaveTimeseries(save_timeseries::Config),
    SaveAttributes(save_attributes::Config),
    Log(log::Config),
    IntegrationDownlink(integration_downlink::Config),
    /// A node whose configuration was rejected (only while collecting
    /// problems; never part of a loaded chain).
    Invalid,
}

const PREFIX: &str = "org.thingsboard.rule.engine.";

/// Who a node is, for its work and its errors.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub chain: std::sync::Arc<str>,
    pub name: String,
    pub label: String,
    /// No connection leaves the node: its outputs go nowhere.
    pub last: bool,
}

/// A store write that ends a message's path: with no node after this
/// one, the write is fire-and-forget (the ticket waits for the commit, and
/// a failed write keeps the message as a dead letter); otherwise the node
/// waits for the commit and emits Success or Failure.
pub fn store_and_emit(
    writes: Vec<crate::store::Write>,
    env: Envelope,
    services: &Services,
    node: &NodeInfo,
    what: &'static str,
) -> NodeOutput {
    let store = services.store.clone();
    if node.last {
        let target = crate::store::FailureTarget {
            chain: node.chain.to_string(),
            node: node.label.clone(),
            message: env.msg,
        };
        if let Err(e) = store.submit_final(writes, env.ticket, target) {
            tracing::error!(chain = %node.chain, node = %node.label, error = %e, "{what} not queued");
        }
        return NodeOutput::Now(Vec::new());
    }
    NodeOutput::Later(Box::pin(async move {
        match store.write(writes, Some(env.ticket.clone())).await {
            Ok(()) => vec![success(env)],
            Err(e) => vec![failure(env, format!("{what} not saved: {e}"))],
        }
    }))
}

/// What a node produced for one message.
pub enum NodeOutput {
    Now(Vec<(String, Envelope)>),
    Later(BoxFuture<'static, Vec<(String, Envelope)>>),
}

impl NodeKind {
    /// Parses a node's configuration; the error says what is wrong.
    pub fn from_config(type_name: &str, config: &Value) -> Result<NodeKind, String> {
        let short = type_name.strip_prefix(PREFIX).unwrap_or(type_name);
        match short {
            "filter.TbMsgTypeSwitchNode" => Ok(NodeKind::MsgTypeSwitch),
            "telemetry.TbMsgTimeseriesNode" => {
                save_timeseries::Config::parse(config).map(NodeKind::SaveTimeseries)
            }
            "telemetry.TbMsgAttributesNode" => {
                save_attributes::Config::parse(config).map(NodeKind::SaveAttributes)
            }
            "action.TbLogNode" => log::Config::parse(config).map(NodeKind::Log),
            "integration.TbIntegrationDownlinkNode" => {
                integration_downlink::Config::parse(config).map(NodeKind::IntegrationDownlink)
            }
            _ => Err(format!(
                "unknown node type {type_name:?}; supported: {}",
                SUPPORTED
                    .iter()
                    .map(|s| format!("{PREFIX}{s}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// The relation names this node can emit.
    pub fn relations(&self) -> Vec<&'static str> {
        match self {
            NodeKind::MsgTypeSwitch => crate::msg::switch_relations().collect(),
            NodeKind::Invalid => Vec::new(),
            _ => vec![relation::SUCCESS, relation::FAILURE],
        }
    }

    /// Whether the node can emit `relation` (compared case-insensitively,
    /// as ThingsBoard does).
    pub fn emits(&self, relation: &str) -> bool {
        self.relations()
            .iter()
            .any(|r| r.eq_ignore_ascii_case(relation))
    }

    /// Processes one message.
    pub fn process(&self, env: Envelope, services: &Services, node: &NodeInfo) -> NodeOutput {
        match self {
            NodeKind::MsgTypeSwitch => msg_type_switch::process(env),
            NodeKind::SaveTimeseries(config) => {
                save_timeseries::process(config, env, services, node)
            }
            NodeKind::SaveAttributes(config) => {
                save_attributes::process(config, env, services, node)
            }
            NodeKind::Log(config) => log::process(config, env, services, &node.name),
            NodeKind::IntegrationDownlink(config) => {
                integration_downlink::process(config, env, services)
            }
            NodeKind::Invalid => NodeOutput::Now(vec![failure(env, "invalid node")]),
        }
    }

    /// Scripts the node runs, for `shardflow check` to compile.
    pub fn scripts(&self) -> Vec<&str> {
        match self {
            NodeKind::Log(config) => config.script.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

const SUPPORTED: &[&str] = &[
    "filter.TbMsgTypeSwitchNode",
    "telemetry.TbMsgTimeseriesNode",
    "telemetry.TbMsgAttributesNode",
    "action.TbLogNode",
    "integration.TbIntegrationDownlinkNode",
];

/// Routes a message to Failure with the reason in its metadata
/// (shardflow's addition: ThingsBoard keeps it only in debug events).
pub fn failure(mut env: Envelope, error: impl Into<String>) -> (String, Envelope) {
    env.msg.metadata.insert("error".into(), error.into());
    (relation::FAILURE.to_string(), env)
}

pub fn success(env: Envelope) -> (String, Envelope) {
    (relation::SUCCESS.to_string(), env)
}
