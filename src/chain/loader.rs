//! Loads a rule chain from ThingsBoard's export JSON into a petgraph graph
//! and validates it.
//!
//! Exports are taken as they are: unknown fields are ignored. Validation
//! collects every problem (unknown node type, bad node configuration,
//! dangling index, self-loop, cycle, a relation the node never emits) and
//! reports them together, each naming the file and the node.

use std::fmt;
use std::path::{Path, PathBuf};

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Deserialize;
use serde_json::Value;

use super::nodes::NodeKind;

/// One node of a chain, as configured.
#[derive(Debug, Clone)]
pub struct NodeDef {
    /// Position in the export's `nodes` array.
    pub index: usize,
    pub name: String,
    /// The ThingsBoard class name.
    pub type_name: String,
    pub kind: NodeKind,
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
    pub name: String,
    pub first: NodeIndex,
    pub graph: DiGraph<NodeDef, String>,
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
    name: Option<String>,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(rename = "firstNodeIndex", default)]
    first_node_index: Option<i64>,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    connections: Option<Vec<RawConnection>>,
}

#[derive(Deserialize)]
struct RawNode {
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    configuration: Option<Value>,
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

/// Reads and validates a chain file.
pub fn load(path: &Path) -> Result<ChainDef, ChainError> {
    let fail = |reason: String| ChainError {
        file: path.to_path_buf(),
        problems: vec![ChainProblem { node: None, reason }],
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read the file: {e}")))?;
    parse(&text, path)
}

/// Parses and validates chain JSON; `file` is used in errors.
pub fn parse(text: &str, file: &Path) -> Result<ChainDef, ChainError> {
    let mut problems = Vec::new();
    let export: Export = serde_json::from_str(text).map_err(|e| ChainError {
        file: file.to_path_buf(),
        problems: vec![ChainProblem {
            node: None,
            reason: format!("not a ThingsBoard rule chain export: {e}"),
        }],
    })?;
    let name = export
        .rule_chain
        .and_then(|c| c.name)
        .unwrap_or_else(|| file.display().to_string());

    let mut graph = DiGraph::new();
    for (index, raw) in export.metadata.nodes.into_iter().enumerate() {
        let node_name = raw.name.unwrap_or_else(|| format!("node {index}"));
        let config = raw.configuration.unwrap_or(Value::Null);
        let label = format!("{node_name:?} (#{index})");
        let kind = match NodeKind::from_config(&raw.type_name, &config) {
            Ok(kind) => kind,
            Err(reason) => {
                problems.push(ChainProblem {
                    node: Some(label),
                    reason,
                });
                NodeKind::Invalid
            }
        };
        graph.add_node(NodeDef {
            index,
            name: node_name,
            type_name: raw.type_name,
            kind,
        });
    }

    let count = graph.node_count();
    let first = match export.metadata.first_node_index {
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
    };

    for connection in export.metadata.connections.unwrap_or_default() {
        if let Some((from, to)) = check_connection(&graph, &connection, &mut problems) {
            graph.add_edge(from, to, connection.relation);
        }
    }

    if petgraph::algo::is_cyclic_directed(&graph) {
        let cycle: Vec<String> = petgraph::algo::kosaraju_scc(&graph)
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

    if !problems.is_empty() {
        return Err(ChainError {
            file: file.to_path_buf(),
            problems,
        });
    }
    Ok(ChainDef {
        file: file.to_path_buf(),
        name,
        first,
        graph,
    })
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
    if !matches!(node.kind, NodeKind::Invalid) && !node.kind.emits(&connection.relation) {
        problems.push(ChainProblem {
            node: Some(node.label()),
            reason: format!(
                "{describe}: this node never emits {:?} (it emits {})",
                connection.relation,
                node.kind.relations().join(", ")
            ),
        });
        return None;
    }
    Some((from, to))
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

    const SWITCH: &str = r#"{"type": "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode", "name": "switch", "configuration": {"version": 0}}"#;
    const SAVE: &str = r#"{"type": "org.thingsboard.rule.engine.telemetry.TbMsgTimeseriesNode", "name": "save", "configuration": {"defaultTTL": 0}}"#;

    #[test]
    fn a_valid_chain_loads() {
        let text = chain(
            &format!("{SWITCH},{SAVE}"),
            r#"{"fromIndex": 0, "toIndex": 1, "type": "Post telemetry"}"#,
        );
        let def = parse(&text, Path::new("t.json")).unwrap();
        assert_eq!(def.graph.edge_count(), 1);
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
        let err = parse(&text, Path::new("bad.json")).unwrap_err();
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
    fn cycles_are_rejected() {
        let log = r#"{"type": "org.thingsboard.rule.engine.action.TbLogNode", "name": "log", "configuration": {}}"#;
        let text = chain(
            &format!("{log},{log}"),
            r#"{"fromIndex": 0, "toIndex": 1, "type": "Success"}, {"fromIndex": 1, "toIndex": 0, "type": "Success"}"#,
        );
        let err = parse(&text, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
    }
}
