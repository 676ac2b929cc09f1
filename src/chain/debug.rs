//! Debug events, as ThingsBoard records them for nodes in debug mode: each
//! message in and out of the node, with the relation taken and the error.
//!
//! Events are best-effort: they are written through the store's writer
//! without holding any record, at most `per_node_per_second` per node (the
//! rest are counted and reported at WARN once a minute), and trimmed to a
//! retention cap in the background. They never slow down or fail the
//! messages they describe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::nodes::NodeInfo;
use crate::msg::TbMsg;
use crate::store::{DebugEvent, Store, Write};

/// Which way the message went.
#[derive(Debug, Clone, Copy)]
pub enum Direction<'a> {
    In,
    Out(&'a str),
}

/// Records debug events for nodes that have debug on.
#[derive(Clone)]
pub struct DebugRecorder {
    store: Store,
    per_node_per_second: u32,
    windows: Arc<Mutex<Windows>>,
}

#[derive(Default)]
struct Windows {
    by_node: HashMap<String, (Instant, u32)>,
    dropped: u64,
    last_report: Option<Instant>,
}

impl DebugRecorder {
    pub fn new(store: Store, per_node_per_second: u32) -> DebugRecorder {
        DebugRecorder {
            store,
            per_node_per_second,
            windows: Arc::default(),
        }
    }

    pub fn record(
        &self,
        node: &NodeInfo,
        direction: Direction<'_>,
        msg: &TbMsg,
        error: Option<&str>,
    ) {
        if !self.admit(&node.label, &node.chain) {
            return;
        }
        let (kind, relation) = match direction {
            Direction::In => ("IN", None),
            Direction::Out(relation) => ("OUT", Some(relation.to_string())),
        };
        let event = DebugEvent {
            id: 0,
            ts: crate::msg::now_millis(),
            chain: node.chain.to_string(),
            node: node.label.clone(),
            direction: kind.to_string(),
            relation,
            msg_id: msg.id.to_string(),
            msg_type: msg.msg_type.clone(),
            originator: msg.originator.to_string(),
            data: msg.data.clone(),
            metadata: serde_json::to_string(&msg.metadata).unwrap_or_default(),
            error: error.map(str::to_string),
        };
        if let Err(e) = self.store.submit(vec![Write::DebugEvent(event)], None) {
            tracing::warn!(chain = %node.chain, node = %node.label, error = %e, "debug event not stored");
        }
    }

    /// The per-node rate limit; drops are reported at most once a minute.
    fn admit(&self, node: &str, chain: &str) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let key = format!("{chain}\u{0}{node}");
        let window = windows.by_node.entry(key).or_insert((now, 0));
        if now.duration_since(window.0) >= Duration::from_secs(1) {
            *window = (now, 0);
        }
        if window.1 < self.per_node_per_second {
            window.1 += 1;
            return true;
        }
        windows.dropped += 1;
        let report = windows
            .last_report
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60));
        if report {
            tracing::warn!(
                chain, node, dropped = windows.dropped,
                limit_per_second = self.per_node_per_second,
                "debug events over the per-node rate limit were not recorded ([rules] debug_events_per_second)"
            );
            windows.last_report = Some(now);
            windows.dropped = 0;
        }
        false
    }
}
