//! Rule node types: configuration parsing, the relations each emits, and
//! what each does to a message.
//!
//! Node types are ThingsBoard's class names, with ThingsBoard's
//! configuration fields and relation names. A node turns one message into
//! zero or more `(relation, message)` outputs, either at once or after some
//! asynchronous work (a store commit, a script call, an HTTP request, a
//! PutRecords). A few nodes also act on a timer (message count, generator)
//! or hand the message to another chain (rule chain and output nodes).

pub mod change_originator;
pub mod check_message;
pub mod copy_keys;
pub mod delete_attributes;
pub mod delete_keys;
pub mod generator;
pub mod integration_downlink;
pub mod js_filter;
pub mod js_switch;
pub mod log;
pub mod msg_count;
mod msg_type_switch;
pub mod originator_attributes;
mod originator_type_switch;
pub mod output;
pub mod rename_keys;
pub mod rest_api_call;
pub mod rule_chain;
pub mod save_attributes;
pub mod save_timeseries;
pub mod script;
pub mod template;
pub mod transform;

use std::time::Duration;

use actix::Addr;
use futures::future::BoxFuture;
use serde_json::Value;

use super::{Envelope, NodeActor, Services};
use crate::msg::relation;

/// A node's type and validated configuration (and, for the nodes that
/// keep some, its state).
#[derive(Debug, Clone)]
pub enum NodeKind {
    MsgTypeSwitch,
    OriginatorTypeSwitch,
    JsFilter(script::NodeScript),
    JsSwitch(script::NodeScript),
    CheckMessage(check_message::Config),
    Transform(script::NodeScript),
    RenameKeys(rename_keys::Config),
    CopyKeys(KeySelection),
    DeleteKeys(KeySelection),
    ChangeOriginator(change_originator::Config),
    OriginatorAttributes(originator_attributes::Config),
    SaveTimeseries(save_timeseries::Config),
    SaveAttributes(save_attributes::Config),
    DeleteAttributes(delete_attributes::Config),
    Log(log::Config),
    MsgCount(msg_count::Node),
    Generator(generator::Node),
    RuleChain(rule_chain::Config),
    Output,
    RestApiCall(rest_api_call::Config),
    IntegrationDownlink(integration_downlink::Config),
    /// A node type shardflow does not implement, loaded because the config
    /// lets unknown nodes pass messages to Failure.
    Unsupported(String),
    /// A node whose configuration was rejected (only while collecting
    /// problems; never part of a loaded chain).
    Invalid,
}

const PREFIX: &str = "org.thingsboard.rule.engine.";

/// The node types shardflow runs, by their class name after
/// `org.thingsboard.rule.engine.`.
const SUPPORTED: &[&str] = &[
    "filter.TbMsgTypeSwitchNode",
    "filter.TbOriginatorTypeSwitchNode",
    "filter.TbJsFilterNode",
    "filter.TbJsSwitchNode",
    "filter.TbCheckMessageNode",
    "transform.TbTransformMsgNode",
    "transform.TbRenameKeysNode",
    "transform.TbCopyKeysNode",
    "transform.TbDeleteKeysNode",
    "transform.TbChangeOriginatorNode",
    "metadata.TbGetAttributesNode",
    "telemetry.TbMsgTimeseriesNode",
    "telemetry.TbMsgAttributesNode",
    "telemetry.TbMsgDeleteAttributesNode",
    "action.TbLogNode",
    "action.TbMsgCountNode",
    "debug.TbMsgGeneratorNode",
    "flow.TbRuleChainInputNode",
    "flow.TbRuleChainOutputNode",
    "rest.TbRestApiCallNode",
    "integration.TbIntegrationDownlinkNode",
];

/// Why a node's configuration was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown node type {0:?}; supported: {list}", list = supported_list())]
    UnknownType(String),
    #[error("{0}")]
    Bad(String),
}

impl ConfigError {
    pub fn is_unknown_type(&self) -> bool {
        matches!(self, ConfigError::UnknownType(_))
    }
}

impl From<String> for ConfigError {
    fn from(reason: String) -> Self {
        ConfigError::Bad(reason)
    }
}

impl From<&str> for ConfigError {
    fn from(reason: &str) -> Self {
        ConfigError::Bad(reason.to_string())
    }
}

fn supported_list() -> String {
    SUPPORTED
        .iter()
        .map(|s| format!("{PREFIX}{s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The relations a node can emit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relations {
    Fixed(Vec<&'static str>),
    /// Decided at run time (a script switch returns relation names, a rule
    /// chain node emits the names of the called chain's output nodes,
    /// checked across files).
    Any,
}

/// Who a node is, for its work and its errors.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub chain: std::sync::Arc<str>,
    pub name: String,
    pub label: String,
    /// No connection leaves the node: its outputs go nowhere.
    pub last: bool,
}

/// What a node may use while it processes a message.
pub struct NodeCtx<'a> {
    pub services: &'a Services,
    pub info: &'a NodeInfo,
    /// The node's own actor, for the nodes that expect an answer back
    /// (a rule chain node waits for the called chain's output).
    pub addr: &'a Addr<NodeActor>,
}

/// What a node produced for one message.
pub enum NodeOutput {
    Now(Vec<(String, Envelope)>),
    Later(BoxFuture<'static, Vec<(String, Envelope)>>),
}

impl NodeKind {
    /// Parses a node's configuration; the error says what is wrong.
    /// `version` is the export's `configurationVersion` (0 when absent).
    /// `origin` names the node in script errors.
    pub fn from_config(
        type_name: &str,
        config: &Value,
        version: u32,
        origin: &str,
    ) -> Result<NodeKind, ConfigError> {
        let short = type_name.strip_prefix(PREFIX).unwrap_or(type_name);
        if !(config.is_object() || config.is_null()) {
            return Err(ConfigError::Bad(format!(
                "configuration must be a JSON object, got {}",
                crate::convert::uplink::json_kind(config)
            )));
        }
        let kind = match short {
            "filter.TbMsgTypeSwitchNode" => NodeKind::MsgTypeSwitch,
            "filter.TbOriginatorTypeSwitchNode" => NodeKind::OriginatorTypeSwitch,
            "filter.TbJsFilterNode" => NodeKind::JsFilter(js_filter::parse(config, origin)?),
            "filter.TbJsSwitchNode" => NodeKind::JsSwitch(js_switch::parse(config, origin)?),
            "filter.TbCheckMessageNode" => {
                NodeKind::CheckMessage(check_message::Config::parse(config)?)
            }
            "transform.TbTransformMsgNode" => {
                NodeKind::Transform(transform::parse(config, origin)?)
            }
            "transform.TbRenameKeysNode" => {
                NodeKind::RenameKeys(rename_keys::Config::parse(config, version)?)
            }
            "transform.TbCopyKeysNode" => {
                NodeKind::CopyKeys(KeySelection::parse(config, "copyFrom", version, "copy")?)
            }
            "transform.TbDeleteKeysNode" => NodeKind::DeleteKeys(KeySelection::parse(
                config,
                "deleteFrom",
                version,
                "delete",
            )?),
            "transform.TbChangeOriginatorNode" => {
                NodeKind::ChangeOriginator(change_originator::Config::parse(config)?)
            }
            "metadata.TbGetAttributesNode" => {
                NodeKind::OriginatorAttributes(originator_attributes::Config::parse(config)?)
            }
            "telemetry.TbMsgTimeseriesNode" => {
                NodeKind::SaveTimeseries(save_timeseries::Config::parse(config)?)
            }
            "telemetry.TbMsgAttributesNode" => {
                NodeKind::SaveAttributes(save_attributes::Config::parse(config)?)
            }
            "telemetry.TbMsgDeleteAttributesNode" => {
                NodeKind::DeleteAttributes(delete_attributes::Config::parse(config)?)
            }
            "action.TbLogNode" => NodeKind::Log(log::Config::parse(config, origin)?),
            "action.TbMsgCountNode" => NodeKind::MsgCount(msg_count::Node::parse(config)?),
            "debug.TbMsgGeneratorNode" => {
                NodeKind::Generator(generator::Node::parse(config, origin)?)
            }
            "flow.TbRuleChainInputNode" => NodeKind::RuleChain(rule_chain::Config::parse(config)?),
            "flow.TbRuleChainOutputNode" => NodeKind::Output,
            "rest.TbRestApiCallNode" => {
                NodeKind::RestApiCall(rest_api_call::Config::parse(config)?)
            }
            "integration.TbIntegrationDownlinkNode" => {
                NodeKind::IntegrationDownlink(integration_downlink::Config::parse(config)?)
            }
            _ => return Err(ConfigError::UnknownType(type_name.to_string())),
        };
        Ok(kind)
    }

    /// The relation names this node can emit.
    pub fn relations(&self) -> Relations {
        use relation::{FAILURE, SUCCESS};
        let fixed = match self {
            NodeKind::MsgTypeSwitch => crate::msg::switch_relations().collect(),
            NodeKind::OriginatorTypeSwitch => originator_type_switch::RELATIONS
                .iter()
                .copied()
                .chain([FAILURE])
                .collect(),
            NodeKind::JsFilter(_) | NodeKind::CheckMessage(_) => vec!["True", "False", FAILURE],
            NodeKind::JsSwitch(_) | NodeKind::RuleChain(_) => return Relations::Any,
            NodeKind::Output => vec![],
            NodeKind::Unsupported(_) => vec![FAILURE],
            NodeKind::Invalid => Vec::new(),
            _ => vec![SUCCESS, FAILURE],
        };
        Relations::Fixed(fixed)
    }

    /// Processes one message.
    pub fn process(&mut self, env: Envelope, ctx: &NodeCtx<'_>) -> NodeOutput {
        let services = ctx.services;
        match self {
            NodeKind::MsgTypeSwitch => msg_type_switch::process(env),
            NodeKind::OriginatorTypeSwitch => originator_type_switch::process(env),
            NodeKind::JsFilter(config) => js_filter::process(config, env, services),
            NodeKind::JsSwitch(config) => js_switch::process(config, env, services),
            NodeKind::CheckMessage(config) => check_message::process(config, env),
            NodeKind::Transform(config) => transform::process(config, env, services),
            NodeKind::RenameKeys(config) => rename_keys::process(config, env),
            NodeKind::CopyKeys(config) => copy_keys::process(config, env),
            NodeKind::DeleteKeys(config) => delete_keys::process(config, env),
            NodeKind::ChangeOriginator(config) => change_originator::process(config, env, services),
            NodeKind::OriginatorAttributes(config) => {
                originator_attributes::process(config, env, services)
            }
            NodeKind::SaveTimeseries(config) => save_timeseries::process(config, env, ctx),
            NodeKind::SaveAttributes(config) => save_attributes::process(config, env, ctx),
            NodeKind::DeleteAttributes(config) => delete_attributes::process(config, env, ctx),
            NodeKind::Log(config) => log::process(config, env, services, &ctx.info.name),
            NodeKind::MsgCount(node) => node.count(env),
            NodeKind::Generator(_) => NodeOutput::Now(vec![failure(
                env,
                "a generator node takes no messages; it makes its own",
            )]),
            NodeKind::RuleChain(config) => rule_chain::process(config, env, ctx),
            NodeKind::Output => output::process(env, ctx),
            NodeKind::RestApiCall(config) => rest_api_call::process(config, env, services),
            NodeKind::IntegrationDownlink(config) => {
                integration_downlink::process(config, env, services)
            }
            NodeKind::Unsupported(type_name) => {
                let reason = format!("node type {type_name:?} is not supported by shardflow");
                NodeOutput::Now(vec![failure(env, reason)])
            }
            NodeKind::Invalid => NodeOutput::Now(vec![failure(env, "invalid node")]),
        }
    }

    /// How often the node acts on its own (message count, generator).
    pub fn tick_interval(&self) -> Option<Duration> {
        match self {
            NodeKind::MsgCount(node) => Some(node.interval()),
            NodeKind::Generator(node) => Some(node.period()),
            _ => None,
        }
    }

    /// Scripts the node runs, for the set's validation to compile.
    pub fn scripts(&self) -> Vec<&script::NodeScript> {
        match self {
            NodeKind::JsFilter(script)
            | NodeKind::JsSwitch(script)
            | NodeKind::Transform(script) => {
                vec![script]
            }
            NodeKind::Generator(n) => vec![n.script()],
            NodeKind::Log(c) => c.script.iter().collect(),
            _ => Vec::new(),
        }
    }
}

/// A store write that ends a message's path: with no node after this
/// one, the write is fire-and-forget (the ticket waits for the commit, and
/// a failed write keeps the message as a dead letter); otherwise the node
/// waits for the commit and emits Success or Failure.
pub fn store_and_emit(
    writes: Vec<crate::store::Write>,
    env: Envelope,
    ctx: &NodeCtx<'_>,
    what: &'static str,
) -> NodeOutput {
    let store = ctx.services.store.clone();
    if ctx.info.last && !env.in_called_chain() {
        let target = crate::store::FailureTarget {
            chain: ctx.info.chain.to_string(),
            node: ctx.info.label.clone(),
            message: env.msg,
        };
        if let Err(e) = store.submit_final(writes, env.ticket, target) {
            tracing::error!(chain = %ctx.info.chain, node = %ctx.info.label, error = %e, "{what} not queued");
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

/// Routes a message to Failure with the reason in its metadata
/// (shardflow's addition: ThingsBoard keeps it only in debug events).
pub fn failure(mut env: Envelope, error: impl Into<String>) -> (String, Envelope) {
    env.msg.metadata.insert("error".into(), error.into());
    (relation::FAILURE.to_string(), env)
}

pub fn success(env: Envelope) -> (String, Envelope) {
    (relation::SUCCESS.to_string(), env)
}

/// A list of strings from a configuration field (absent means empty).
pub fn string_list(config: &Value, field: &str) -> Result<Vec<String>, String> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{field} must be a list of strings, got {item}"))
            })
            .collect(),
        Some(other) => Err(format!("{field} must be a list of strings, got {other}")),
    }
}

/// A boolean configuration field with a default.
pub fn flag(config: &Value, field: &str, default: bool) -> Result<bool, String> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(format!("{field} must be true or false, got {other}")),
    }
}

/// Which side of the message a key node works on: ThingsBoard's
/// `DATA`/`METADATA` field of configuration version 1, or the boolean
/// `fromMetadata` of version 0.
pub fn message_side(config: &Value, field: &str, version: u32) -> Result<MessageSide, String> {
    if let Some(value) = config.get(field).filter(|v| !v.is_null()) {
        return match value.as_str() {
            Some("DATA") => Ok(MessageSide::Data),
            Some("METADATA") => Ok(MessageSide::Metadata),
            _ => Err(format!(
                "{field} must be \"DATA\" or \"METADATA\", got {value}"
            )),
        };
    }
    if version >= 1 {
        return Err(format!("{field} is missing (\"DATA\" or \"METADATA\")"));
    }
    Ok(if flag(config, "fromMetadata", false)? {
        MessageSide::Metadata
    } else {
        MessageSide::Data
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageSide {
    Data,
    Metadata,
}

/// The message data as a JSON object, or why it is not one.
pub fn data_object(env: &Envelope) -> Result<serde_json::Map<String, Value>, String> {
    match serde_json::from_str::<Value>(&env.msg.data) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("message data is not a JSON object".into()),
        Err(e) => Err(format!("message data is not JSON: {e}")),
    }
}

/// Keys chosen by patterns (regular expressions matched against the whole
/// key, as ThingsBoard does) on one side of the message: what the copy and
/// delete keys nodes work on.
#[derive(Debug, Clone)]
pub struct KeySelection {
    pub side: MessageSide,
    pub keys: Vec<regex::Regex>,
}

impl KeySelection {
    /// `side_field` names the version-1 side field (`copyFrom`,
    /// `deleteFrom`); `what` the node's action, for errors.
    pub fn parse(
        config: &Value,
        side_field: &str,
        version: u32,
        what: &str,
    ) -> Result<KeySelection, String> {
        let keys = string_list(config, "keys")?;
        if keys.is_empty() {
            return Err(format!("keys is empty: nothing to {what}"));
        }
        let keys = keys
            .iter()
            .map(|key| {
                regex::Regex::new(&format!("^(?:{key})$")).map_err(|e| {
                    format!("key pattern {key:?} is not a valid regular expression: {e}")
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(KeySelection {
            side: message_side(config, side_field, version)?,
            keys,
        })
    }

    pub fn matches(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k.is_match(key))
    }
}
