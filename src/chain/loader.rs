//! Loads one rule chain file, in ThingsBoard's export format, into a
//! petgraph graph and validates what can be checked within the file.
//!
//! Exports are taken as they are: unknown fields are ignored, `debugMode`
//! and `debugSettings` are both read, `configurationVersion` selects a
//! node's configuration layout, and layout info (`additionalInfo.layoutX/Y`)
//! is kept for drawing. Legacy `ruleChainConnections` become rule chain
//! hops. Validation collects every problem (unknown node type, bad node
//! configuration, dangling index, self-loop, cycle, a relation the node
//! never emits) and reports them together, each naming the file and the
//! node. What spans files (references between chains) is checked by
//! [`super::set`].

use std::fmt;
use std::path::{Path, PathBuf};

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Deserialize;
use serde_json::Value;

use super::nodes::{NodeKind, Relations};

/// What to do with a node type shardflow does not implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownNodes {
    /// The chain is rejected.
    #[default]
    Reject,
    /// The node is loaded and routes every message to Failure.
    Failure,
}

/// When a node records debug events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DebugSettings {
    /// Every message in and out.
    pub all: bool,
    /// Until this time (epoch ms) every message in and out, as
    /// ThingsBoard's time-limited debug mode.
    pub all_until_ms: i64,
    /// Messages routed to Failure.
    pub failures: bool,
}

impl DebugSettings {
    pub fn any(&self) -> bool {
        self.all || self.all_until_ms > 0 || self.failures
    }

    /// Whether every event is recorded now (the clock is read only for a
    /// time-limited debug mode).
    pub fn all_now(&self) -> bool {
        self.all || (self.all_until_ms > 0 && self.all_until_ms > crate::msg::now_millis())
    }
}

/// One node of a chain, as configured.
#[derive(Debug, Clone)]
pub struct NodeDef {
    /// Position in the export's `nodes` array.
    pub index: usize,
    pub name: String,
    /// The ThingsBoard class name.
    pub type_name: String,
    pub kind: NodeKind,
    pub debug: DebugSettings,
    /// `additionalInfo.layoutX/layoutY`, when the export has them.
    pub layout: Option<(f64, f64)>,
}

impl NodeDef {
    /// `name (#index, ShortType)`, for logs and errors.
    pub fn label(&self) -> String {
        let short = self.type_name.rsplit('.').next().unwrap_or(&self.type_name);
        format!("{:?} (#{}, {})", self.name, self.index, short)
    }
}

/// A validated rule chain: nodes and relation-labelled edges.
#[derive(Debug, Clone)]
pub struct ChainDef {
    pub file: PathBuf,
    /// `ruleChain.id.id` when the export has one, else the file name
    /// without `.json`.
    pub id: String,
    /// The file name without `.json`; chains may be referred to by it.
    pub stem: String,
    pub name: String,
    pub first: NodeIndex,
    pub graph: DiGraph<NodeDef, String>,
    /// A hash of the file's text: an unchanged file keeps its actors on
    /// reload.
    pub content_hash: u64,
}

impl ChainDef {
    /// Names of the chain's output nodes: the relations a rule chain node
    /// calling this chain can emit.
    pub fn outputs(&self) -> Vec<&str> {
        self.graph
            .node_weights()
            .filter(|n| matches!(n.kind, NodeKind::Output))
            .map(|n| n.name.as_str())
            .collect()
    }
}

/// One problem in a chain file.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainProblem {
    /// The node concerned, when there is one.
    pub node: Option<String>,
    pub reason: String,
}

/// Every problem found in a chain file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ChainError {
    pub file: PathBuf,
    pub problems: Vec<ChainProblem>,
}

impl ChainError {
    pub fn single(file: &Path, reason: String) -> ChainError {
        ChainError {
            file: file.to_path_buf(),
            problems: vec![ChainProblem { node: None, reason }],
        }
    }

    /// One line per problem: `rule chain FILE: node N: reason`.
    pub fn lines(&self) -> Vec<String> {
        let file = self.file.display();
        self.problems
            .iter()
            .map(|problem| match &problem.node {
                Some(node) => format!("rule chain {file}: node {node}: {}", problem.reason),
                None => format!("rule chain {file}: {}", problem.reason),
            })
            .collect()
    }
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} problem(s) in rule chain {}:",
            self.problems.len(),
            self.file.display()
        )?;
        for problem in &self.problems {
            match &problem.node {
                Some(node) => write!(f, "\n  - node {node}: {}", problem.reason)?,
                None => write!(f, "\n  - {}", problem.reason)?,
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Export {
    #[serde(rename = "ruleChain", default)]
    rule_chain: Option<ChainInfo>,
    metadata: Metadata,
}

#[derive(Deserialize, Default)]
struct ChainInfo {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "debugMode", default)]
    debug_mode: Option<bool>,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(rename = "firstNodeIndex", default)]
    first_node_index: Option<i64>,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    connections: Option<Vec<RawConnection>>,
    #[serde(rename = "ruleChainConnections", default)]
    rule_chain_connections: Option<Vec<RawChainConnection>>,
}

#[derive(Deserialize)]
struct RawNode {
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    configuration: Option<Value>,
    #[serde(rename = "configurationVersion", default)]
    configuration_version: Option<u32>,
    #[serde(rename = "debugMode", default)]
    debug_mode: Option<bool>,
    #[serde(rename = "debugSettings", default)]
    debug_settings: Option<RawDebugSettings>,
    #[serde(rename = "additionalInfo", default)]
    additional_info: Option<Value>,
}

#[derive(Deserialize, Default)]
struct RawDebugSettings {
    #[serde(rename = "failuresEnabled", default)]
    failures_enabled: Option<bool>,
    #[serde(rename = "allEnabled", default)]
    all_enabled: Option<bool>,
    #[serde(rename = "allEnabledUntil", default)]
    all_enabled_until: Option<i64>,
}

#[derive(Deserialize)]
struct RawConnection {
    #[serde(rename = "fromIndex")]
    from_index: i64,
    #[serde(rename = "toIndex")]
    to_index: i64,
    #[serde(rename = "type")]
    relation: String,
}

/// A connection to another chain, as exports before rule chain nodes
/// wrote them.
#[derive(Deserialize)]
struct RawChainConnection {
    #[serde(rename = "fromIndex")]
    from_index: i64,
    #[serde(rename = "targetRuleChainId")]
    target: Value,
    #[serde(rename = "type")]
    relation: String,
}

/// An entity id as exports write it: `{entityType, id}` or a bare string.
pub fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Object(o) => o.get("id").and_then(id_text),
        _ => None,
    }
}

/// Reads and validates a chain file.
pub fn load(path: &Path, unknown: UnknownNodes) -> Result<ChainDef, ChainError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ChainError::single(path, format!("cannot read the file: {e}")))?;
    parse(&text, path, unknown)
}

/// Parses and validates chain JSON; `file` is used in errors.
pub fn parse(text: &str, file: &Path, unknown: UnknownNodes) -> Result<ChainDef, ChainError> {
    let (def, problems) = parse_with_problems(text, file, unknown)?;
    if problems.is_empty() {
        Ok(def)
    } else {
        Err(ChainError {
            file: file.to_path_buf(),
            problems,
        })
    }
}

/// Parses chain JSON, keeping what is usable of a chain that has problems
/// (nodes that were rejected are `Invalid`, bad connections left out), so
/// that checks across files can still look at it. Fails only when the
/// text is no chain export at all.
pub fn parse_with_problems(
    text: &str,
    file: &Path,
    unknown: UnknownNodes,
) -> Result<(ChainDef, Vec<ChainProblem>), ChainError> {
    let mut problems = Vec::new();
    let export: Export = serde_json::from_str(text).map_err(|e| {
        ChainError::single(file, format!("not a ThingsBoard rule chain export: {e}"))
    })?;
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let info = export.rule_chain.unwrap_or_default();
    let id = info
        .id
        .as_ref()
        .and_then(id_text)
        .unwrap_or_else(|| stem.clone());
    let name = info.name.unwrap_or_else(|| stem.clone());
    let chain_debug = info.debug_mode.unwrap_or(false);

    let mut graph = DiGraph::new();
    for (index, raw) in export.metadata.nodes.into_iter().enumerate() {
        graph.add_node(node_def(
            file,
            index,
            raw,
            chain_debug,
            unknown,
            &mut problems,
        ));
    }

    let first = first_node(
        export.metadata.first_node_index,
        graph.node_count(),
        &mut problems,
    );
    for connection in export.metadata.connections.unwrap_or_default() {
        if let Some((from, to)) = check_connection(&graph, &connection, &mut problems) {
            graph.add_edge(from, to, connection.relation);
        }
    }
    for hop in export.metadata.rule_chain_connections.unwrap_or_default() {
        add_chain_hop(&mut graph, hop, &mut problems);
    }
    check_acyclic(&graph, &mut problems);

    let def = ChainDef {
        file: file.to_path_buf(),
        id,
        stem,
        name,
        first,
        graph,
        content_hash: content_hash(text),
    };
    Ok((def, problems))
}

fn node_def(
    file: &Path,
    index: usize,
    raw: RawNode,
    chain_debug: bool,
    unknown: UnknownNodes,
    problems: &mut Vec<ChainProblem>,
) -> NodeDef {
    let name = raw.name.unwrap_or_else(|| format!("node {index}"));
    let config = raw.configuration.unwrap_or(Value::Null);
    let version = raw.configuration_version.unwrap_or(0);
    let origin = format!("{}: node {name:?} (#{index})", file.display());
    let kind = match NodeKind::from_config(&raw.type_name, &config, version, &origin) {
        Ok(kind) => kind,
        Err(reason) if reason.is_unknown_type() && unknown == UnknownNodes::Failure => {
            NodeKind::Unsupported(raw.type_name.clone())
        }
        Err(reason) => {
            problems.push(ChainProblem {
                node: Some(format!("{name:?} (#{index})")),
                reason: reason.to_string(),
            });
            NodeKind::Invalid
        }
    };
    let settings = raw.debug_settings.unwrap_or_default();
    let debug = DebugSettings {
        all: chain_debug || raw.debug_mode.unwrap_or(false) || settings.all_enabled == Some(true),
        all_until_ms: settings.all_enabled_until.unwrap_or(0),
        failures: settings.failures_enabled.unwrap_or(false),
    };
    let layout = raw.additional_info.as_ref().and_then(|info| {
        Some((
            info.get("layoutX")?.as_f64()?,
            info.get("layoutY")?.as_f64()?,
        ))
    });
    NodeDef {
        index,
        name,
        type_name: raw.type_name,
        kind,
        debug,
        layout,
    }
}

fn first_node(index: Option<i64>, count: usize, problems: &mut Vec<ChainProblem>) -> NodeIndex {
    match index {
        Some(i) if i >= 0 && (i as usize) < count => NodeIndex::new(i as usize),
        Some(i) => {
            problems.push(ChainProblem {
                node: None,
                reason: format!("firstNodeIndex {i} is out of range (the chain has {count} nodes)"),
            });
            NodeIndex::new(0)
        }
        None => {
            problems.push(ChainProblem {
                node: None,
                reason: "firstNodeIndex is missing: no node receives messages".into(),
            });
            NodeIndex::new(0)
        }
    }
}

fn check_connection(
    graph: &DiGraph<NodeDef, String>,
    connection: &RawConnection,
    problems: &mut Vec<ChainProblem>,
) -> Option<(NodeIndex, NodeIndex)> {
    let count = graph.node_count() as i64;
    let describe = format!(
        "connection {} -> {} ({:?})",
        connection.from_index, connection.to_index, connection.relation
    );
    let in_range = |i: i64| i >= 0 && i < count;
    if !in_range(connection.from_index) || !in_range(connection.to_index) {
        problems.push(ChainProblem {
            node: None,
            reason: format!("{describe} points outside the {count} nodes (dangling index)"),
        });
        return None;
    }
    let from = NodeIndex::new(connection.from_index as usize);
    let to = NodeIndex::new(connection.to_index as usize);
    if from == to {
        problems.push(ChainProblem {
            node: Some(graph[from].label()),
            reason: format!("{describe} connects the node to itself"),
        });
        return None;
    }
    let node = &graph[from];
    if let Relations::Fixed(relations) = node.kind.relations() {
        if !matches!(node.kind, NodeKind::Invalid)
            && !relations
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&connection.relation))
        {
            problems.push(ChainProblem {
                node: Some(node.label()),
                reason: format!(
                    "{describe}: this node never emits {:?} (it emits {})",
                    connection.relation,
                    relations.join(", ")
                ),
            });
            return None;
        }
    }
    Some((from, to))
}

/// A legacy connection to another chain becomes an edge to a rule chain
/// node of its own.
fn add_chain_hop(
    graph: &mut DiGraph<NodeDef, String>,
    hop: RawChainConnection,
    problems: &mut Vec<ChainProblem>,
) {
    let count = graph.node_count() as i64;
    if hop.from_index < 0 || hop.from_index >= count {
        problems.push(ChainProblem {
            node: None,
            reason: format!(
                "ruleChainConnections entry from {} points outside the {count} nodes (dangling index)",
                hop.from_index
            ),
        });
        return;
    }
    let Some(target) = id_text(&hop.target) else {
        problems.push(ChainProblem {
            node: None,
            reason: "a ruleChainConnections entry has no targetRuleChainId".into(),
        });
        return;
    };
    let from = NodeIndex::new(hop.from_index as usize);
    let index = graph.node_count();
    let to = graph.add_node(NodeDef {
        index,
        name: format!("to rule chain {target}"),
        type_name: "org.thingsboard.rule.engine.flow.TbRuleChainInputNode".into(),
        kind: NodeKind::RuleChain(super::nodes::rule_chain::Config { target }),
        debug: DebugSettings::default(),
        layout: None,
    });
    graph.add_edge(from, to, hop.relation);
}

fn check_acyclic(graph: &DiGraph<NodeDef, String>, problems: &mut Vec<ChainProblem>) {
    if !petgraph::algo::is_cyclic_directed(graph) {
        return;
    }
    let cycle: Vec<String> = petgraph::algo::kosaraju_scc(graph)
        .into_iter()
        .filter(|scc| scc.len() > 1)
        .flatten()
        .map(|i| graph[i].label())
        .collect();
    problems.push(ChainProblem {
        node: None,
        reason: format!("the connections form a cycle through {}", cycle.join(", ")),
    });
}

/// FNV-1a over the file's text: stable across runs, enough to tell an
/// edited file from an untouched one.
pub fn content_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(nodes: &str, connections: &str) -> String {
        format!(
            r#"{{"ruleChain": {{"name": "t"}}, "metadata": {{"firstNodeIndex": 0,
            "nodes": [{nodes}], "connections": [{connections}]}}}}"#
        )
    }

    fn parse_ok(text: &str) -> ChainDef {
        parse(text, Path::new("t.json"), UnknownNodes::Reject).unwrap()
    }

    const SWITCH: &str = r#"{"type": "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode", "name": "switch", "configuration": {"version": 0}}"#;
    const SAVE: &str = r#"{"type": "org.thingsboard.rule.engine.telemetry.TbMsgTimeseriesNode", "name": "save", "configuration": {"defaultTTL": 0}}"#;

    #[test]
    fn a_valid_chain_loads() {
        let text = chain(
            &format!("{SWITCH},{SAVE}"),
            r#"{"fromIndex": 0, "toIndex": 1, "type": "Post telemetry"}"#,
        );
        let def = parse_ok(&text);
        assert_eq!(def.graph.edge_count(), 1);
        assert_eq!(def.id, "t");
    }

    #[test]
    fn every_problem_is_reported_with_its_node() {
        let unknown = r#"{"type": "org.thingsboard.rule.engine.Nope", "name": "mystery"}"#;
        let text = chain(
            &format!("{SWITCH},{SAVE},{unknown}"),
            r#"{"fromIndex": 0, "toIndex": 7, "type": "Post telemetry"},
               {"fromIndex": 1, "toIndex": 1, "type": "Success"},
               {"fromIndex": 0, "toIndex": 1, "type": "Telemetry please"}"#,
        );
        let err = parse(&text, Path::new("bad.json"), UnknownNodes::Reject).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 4, "{text}");
        assert!(text.contains("bad.json"));
        assert!(
            text.contains("mystery") && text.contains("unknown node type"),
            "{text}"
        );
        assert!(text.contains("dangling"), "{text}");
        assert!(text.contains("itself"), "{text}");
        assert!(text.contains("never emits"), "{text}");
    }

    #[test]
    fn a_configuration_that_is_not_an_object_is_refused() {
        let save = r#"{"type": "org.thingsboard.rule.engine.telemetry.TbMsgTimeseriesNode", "name": "save", "configuration": "x"}"#;
        let err = parse(&chain(save, ""), Path::new("t.json"), UnknownNodes::Reject).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("save")
                && text.contains("configuration must be a JSON object, got a string"),
            "{text}"
        );
    }

    #[test]
    fn unknown_nodes_may_be_let_through_to_failure() {
        let unknown = r#"{"type": "org.thingsboard.rule.engine.Nope", "name": "mystery"}"#;
        let text = chain(
            &format!("{unknown},{SAVE}"),
            r#"{"fromIndex": 0, "toIndex": 1, "type": "Failure"}"#,
        );
        let def = parse(&text, Path::new("u.json"), UnknownNodes::Failure).unwrap();
        assert!(matches!(
            def.graph[NodeIndex::new(0)].kind,
            NodeKind::Unsupported(_)
        ));
    }

    #[test]
    fn cycles_are_rejected() {
        let log = r#"{"type": "org.thingsboard.rule.engine.action.TbLogNode", "name": "log", "configuration": {}}"#;
        let text = chain(
            &format!("{log},{log}"),
            r#"{"fromIndex": 0, "toIndex": 1, "type": "Success"}, {"fromIndex": 1, "toIndex": 0, "type": "Success"}"#,
        );
        let err = parse(&text, Path::new("c.json"), UnknownNodes::Reject).unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    #[test]
    fn export_details_are_kept() {
        let text = r#"{"ruleChain": {"id": {"entityType": "RULE_CHAIN", "id": "abc"}, "name": "n",
            "debugMode": false},
          "metadata": {"firstNodeIndex": 0, "nodes": [
            {"type": "org.thingsboard.rule.engine.action.TbLogNode", "name": "a",
             "configurationVersion": 1, "debugSettings": {"failuresEnabled": true, "allEnabled": false,
             "allEnabledUntil": 0}, "additionalInfo": {"layoutX": 10, "layoutY": 20.5},
             "configuration": {}, "someFutureField": 1}],
          "connections": [],
          "ruleChainConnections": [{"fromIndex": 0, "targetRuleChainId": {"entityType": "RULE_CHAIN", "id": "other"},
             "additionalInfo": {}, "type": "Success"}]}}"#;
        let def = parse_ok(text);
        assert_eq!(def.id, "abc");
        let node = &def.graph[NodeIndex::new(0)];
        assert_eq!(node.layout, Some((10.0, 20.5)));
        assert!(node.debug.failures && !node.debug.all);
        let hop = &def.graph[NodeIndex::new(1)];
        assert!(matches!(&hop.kind, NodeKind::RuleChain(c) if c.target == "other"));
        assert_eq!(def.graph.edge_count(), 1);
    }
}
