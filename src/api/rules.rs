//! The rule engine as the API shows it: the loaded chains with their nodes,
//! connections, layout and per-node counts, the last reload's outcome, and
//! the debug events of nodes in debug mode.

use std::sync::atomic::Ordering;

use axum::extract::{RawQuery, State};
use axum::Json;
use serde_json::{json, Value};

use super::{first, query, ApiError, ApiResult, ApiState};
use crate::chain::RuleEngine;
use crate::store::DebugEventFilter;

/// `GET /api/shardflow/ruleChains`: every chain of the running set.
pub async fn rule_chains(State(state): State<ApiState>) -> Json<Value> {
    let set = state.rules.current();
    let chains: Vec<Value> = set
        .chains
        .iter()
        .enumerate()
        .map(|(i, chain)| chain_json(chain, i == set.root))
        .collect();
    Json(json!({ "reload": state.rules.status(), "setVersion": set.version, "chains": chains }))
}

fn chain_json(chain: &RuleEngine, root: bool) -> Value {
    let def = &chain.def;
    let nodes: Vec<Value> = def
        .graph
        .node_indices()
        .map(|index| {
            let node = &def.graph[index];
            let stats = &chain.stats[index.index()];
            json!({
                "index": node.index,
                "name": node.name,
                "type": node.type_name,
                "debugMode": node.debug.any(),
                "layout": node.layout.map(|(x, y)| json!({"x": x, "y": y})),
                "stats": {
                    "in": stats.messages_in.load(Ordering::Relaxed),
                    "errors": stats.failures.load(Ordering::Relaxed),
                    "out": stats.out_counts(),
                },
            })
        })
        .collect();
    let connections: Vec<Value> = def
        .graph
        .edge_indices()
        .filter_map(|edge| {
            let (from, to) = def.graph.edge_endpoints(edge)?;
            Some(json!({
                "fromIndex": def.graph[from].index,
                "toIndex": def.graph[to].index,
                "type": def.graph[edge],
            }))
        })
        .collect();
    json!({
        "id": def.id,
        "name": def.name,
        "file": def.file.display().to_string(),
        "root": root,
        "version": chain.version,
        "firstNodeIndex": def.graph[def.first].index,
        "nodes": nodes,
        "connections": connections,
    })
}

/// `GET /api/shardflow/events?chain=&node=&limit=`: debug events, newest
/// first.
pub async fn debug_events(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let q = query(raw);
    let limit = match first(&q, "limit") {
        None => 100,
        Some(text) => text
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("limit {text:?} is not a number")))?
            .clamp(1, 10_000),
    };
    let filter = DebugEventFilter {
        chain: first(&q, "chain").map(str::to_string),
        node: first(&q, "node").map(str::to_string),
        limit,
    };
    let store = state.store.clone();
    let events =
        super::blocking(move || store.debug_events(&filter).map_err(ApiError::internal)).await?;
    Ok(Json(json!(events)))
}

/// Per rule node: messages in, failures, and messages out by relation.
pub fn metrics(state: &ApiState, text: &mut String) {
    use std::fmt::Write as _;
    let set = state.rules.current();
    let label = |chain: &RuleEngine, node: &str| {
        format!(
            "chain=\"{}\",node=\"{}\"",
            super::escape_label(chain.name()),
            super::escape_label(node)
        )
    };
    let _ = writeln!(text, "# HELP shardflow_rule_set_version Version of the running rule set (1 at start, +1 per reload).");
    let _ = writeln!(text, "# TYPE shardflow_rule_set_version gauge");
    let _ = writeln!(text, "shardflow_rule_set_version {}", set.version);
    let status = state.rules.status();
    let _ = writeln!(
        text,
        "# HELP shardflow_rule_reload_ok 1 when the last reload attempt succeeded."
    );
    let _ = writeln!(text, "# TYPE shardflow_rule_reload_ok gauge");
    let _ = writeln!(text, "shardflow_rule_reload_ok {}", status.ok as u8);
    let series = [
        (
            "shardflow_rule_node_messages_total",
            "Messages a rule node received.",
        ),
        (
            "shardflow_rule_node_failures_total",
            "Messages a rule node sent to Failure.",
        ),
    ];
    for (name, help) in series {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} counter");
        for chain in &set.chains {
            for index in chain.def.graph.node_indices() {
                let stats = &chain.stats[index.index()];
                let value = if name.ends_with("messages_total") {
                    stats.messages_in.load(Ordering::Relaxed)
                } else {
                    stats.failures.load(Ordering::Relaxed)
                };
                let _ = writeln!(
                    text,
                    "{name}{{{}}} {value}",
                    label(chain, &chain.def.graph[index].name)
                );
            }
        }
    }
    let name = "shardflow_rule_node_relation_total";
    let _ = writeln!(
        text,
        "# HELP {name} Messages a rule node sent, by relation.\n# TYPE {name} counter"
    );
    for chain in &set.chains {
        for index in chain.def.graph.node_indices() {
            let node = &chain.def.graph[index].name;
            for (relation, count) in chain.stats[index.index()].out_counts() {
                let _ = writeln!(
                    text,
                    "{name}{{{},relation=\"{}\"}} {count}",
                    label(chain, node),
                    super::escape_label(&relation)
                );
            }
        }
    }
}
