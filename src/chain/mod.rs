//! The rule engine: rule chains loaded from ThingsBoard's export format,
//! each run as one actix actor per rule node.
//!
//! Messages travel a chain's edges by relation name (case-insensitive).
//! Several matching edges each get a copy. A message whose relation has no
//! edge is done, except `Failure`: it is logged at ERROR and kept in the
//! dead-letter table, so nothing is dropped silently.
//!
//! Every message carries the [`RuleSet`] it entered with: all chains and
//! converters of one version. A rule chain node hands the message to the
//! called chain *of that set*, and a downlink uses that set's converter, so
//! a reload never mixes versions within one message's path. The engine
//! reaches storage and converters through [`Services`] and knows nothing of
//! HTTP or Kinesis.

pub mod debug;
pub mod loader;
pub mod nodes;
pub mod reload;
pub mod set;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use futures::future::BoxFuture;
use petgraph::visit::EdgeRef;

use crate::convert::{ConverterWorker, DownlinkRecord};
use crate::delivery::Ticket;
use crate::msg::{relation, TbMsg};
use crate::store::{Store, Write};
pub use loader::{ChainDef, ChainError};
use nodes::{NodeCtx, NodeInfo, NodeKind, NodeOutput};
pub use reload::Rules;
pub use set::RuleSet;

/// A message on its way through the rule engine, with its delivery
/// ticket, the set of chains and converters it entered with, and where to
/// return to when it is inside a called chain.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Envelope {
    pub msg: TbMsg,
    pub ticket: Ticket,
    pub set: Arc<RuleSet>,
    pub frames: Option<Arc<Frame>>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("msg", &self.msg)
            .field("ticket", &self.ticket)
            .field("set", &self.set.version)
            .finish()
    }
}

impl Envelope {
    /// A copy for another relation: a new message id, the same ticket,
    /// set and frames.
    pub fn copy(&self) -> Envelope {
        Envelope {
            msg: self.msg.copy(),
            ticket: self.ticket.clone(),
            set: self.set.clone(),
            frames: self.frames.clone(),
        }
    }

    /// The same ticket, set and frames around another message (a
    /// transformation's result).
    pub fn with_msg(&self, msg: TbMsg) -> Envelope {
        Envelope {
            msg,
            ticket: self.ticket.clone(),
            set: self.set.clone(),
            frames: self.frames.clone(),
        }
    }

    /// Whether the message was handed here by a rule chain node and goes
    /// back to it from an output node.
    pub fn in_called_chain(&self) -> bool {
        self.frames.is_some()
    }
}

/// A rule chain node waiting for the chain it called: a message reaching
/// an output node of the called chain goes back to `caller`.
#[derive(Debug)]
pub struct Frame {
    pub caller: Addr<NodeActor>,
    pub parent: Option<Arc<Frame>>,
}

/// Sends downlink records somewhere (a Kinesis stream).
pub trait DownlinkSender: Send + Sync {
    fn send(&self, records: Vec<DownlinkRecord>) -> BoxFuture<'static, Result<(), String>>;
}

/// What rule nodes may use.
#[derive(Clone)]
pub struct Services {
    pub store: Store,
    pub js: Addr<ConverterWorker>,
    /// Downlink senders by integration name.
    pub downlinks: HashMap<String, Arc<dyn DownlinkSender>>,
    /// The HTTP client of REST API call nodes.
    pub http: reqwest::Client,
    pub debug: debug::DebugRecorder,
    /// The set new messages enter with (generated and counted messages).
    pub current: Arc<reload::Current>,
}

impl Services {
    /// The downlink integration named `key`, or the only integration with
    /// a downlink converter when `key` is empty.
    pub fn downlink(&self, key: &str, set: &RuleSet) -> Result<(String, DownlinkPath), String> {
        let name = if key.is_empty() {
            let mut all = set.encoders.keys();
            match (all.next(), all.next()) {
                (Some(only), None) => only.clone(),
                (None, _) => return Err("no integration has a downlink converter".into()),
                _ => return Err("integrationId is empty but several integrations have downlink converters; name one".into()),
            }
        } else {
            key.to_string()
        };
        match (set.encoders.get(&name), self.downlinks.get(&name)) {
            (Some(encoder), Some(sender)) => Ok((
                name,
                DownlinkPath {
                    encoder: encoder.clone(),
                    sender: sender.clone(),
                },
            )),
            _ => Err(format!(
                "integration {key:?} is not configured or has no downlink converter"
            )),
        }
    }
}

/// An integration's downlink: its converter (of the message's set) and
/// its producer.
pub struct DownlinkPath {
    pub encoder: Arc<crate::convert::Script>,
    pub sender: Arc<dyn DownlinkSender>,
}

/// Counts of one node, for `/metrics` and the rule chain page.
#[derive(Debug, Default)]
pub struct NodeStats {
    pub messages_in: AtomicU64,
    pub failures: AtomicU64,
    pub out: Mutex<BTreeMap<String, u64>>,
}

impl NodeStats {
    fn count_out(&self, relation: &str) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        match out.get_mut(relation) {
            Some(count) => *count += 1,
            None => {
                out.insert(relation.to_string(), 1);
            }
        }
    }

    pub fn out_counts(&self) -> BTreeMap<String, u64> {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One rule node as an actor.
pub struct NodeActor {
    info: NodeInfo,
    kind: NodeKind,
    debug: loader::DebugSettings,
    services: Services,
    stats: Arc<NodeStats>,
    /// Set when the chain is replaced by a reload: nodes that act on a
    /// timer stop.
    retired: Arc<AtomicBool>,
    /// Outgoing edges: (relation, next node).
    routes: Vec<(String, Addr<NodeActor>)>,
    /// A timed action (generator) is still running.
    ticking: bool,
    /// Bounds the ERROR lines of messages kept as dead letters.
    failure_log: crate::log_budget::LogBudget,
}

impl Actor for NodeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(every) = self.kind.tick_interval() {
            ctx.run_interval(every, |node, ctx| node.tick(ctx));
        }
    }
}

impl Handler<Envelope> for NodeActor {
    type Result = ();

    fn handle(&mut self, env: Envelope, ctx: &mut Context<Self>) {
        self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        if self.debug.all_now() {
            self.services
                .debug
                .record(&self.info, debug::Direction::In, &env.msg, None);
        }
        let addr = ctx.address();
        let node_ctx = NodeCtx {
            services: &self.services,
            info: &self.info,
            addr: &addr,
        };
        let output = self.kind.process(env, &node_ctx);
        self.take(output, ctx);
    }
}

/// The outputs of a node's asynchronous work, to be routed.
#[derive(Message)]
#[rtype(result = "()")]
struct Finished(Vec<(String, Envelope)>);

impl Handler<Finished> for NodeActor {
    type Result = ();

    fn handle(&mut self, Finished(outputs): Finished, _: &mut Context<Self>) {
        self.ticking = false;
        self.route(outputs);
    }
}

/// A message coming back from a called chain's output node, to be routed
/// by the output node's name.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Returned {
    pub relation: String,
    pub env: Envelope,
}

impl Handler<Returned> for NodeActor {
    type Result = ();

    fn handle(&mut self, returned: Returned, _: &mut Context<Self>) {
        self.route(vec![(returned.relation, returned.env)]);
    }
}

impl NodeActor {
    fn take(&mut self, output: NodeOutput, ctx: &mut Context<Self>) {
        match output {
            NodeOutput::Now(outputs) => self.route(outputs),
            NodeOutput::Later(work) => {
                // A task of its own, not a future of the actor's context:
                // actix polls every context future on each wake-up, which
                // is quadratic with thousands of pending store commits.
                let node = ctx.address();
                actix_rt::spawn(async move {
                    node.do_send(Finished(work.await));
                });
            }
        }
    }

    /// The node's timed action; a node of a chain replaced by a reload
    /// stops instead.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.retired.load(Ordering::Acquire) {
            ctx.stop();
            return;
        }
        if self.ticking {
            return;
        }
        let Some(set) = self.services.current.get() else {
            return;
        };
        let output = match &mut self.kind {
            NodeKind::MsgCount(node) => node.tick(&self.info, set),
            NodeKind::Generator(node) => node.tick(&self.info, set, &self.services),
            _ => None,
        };
        match output {
            Some(NodeOutput::Later(work)) => {
                self.ticking = true;
                self.take(NodeOutput::Later(work), ctx);
            }
            Some(now) => self.take(now, ctx),
            None => {}
        }
    }

    fn route(&mut self, outputs: Vec<(String, Envelope)>) {
        for (relation, env) in outputs {
            self.observe(&relation, &env);
            let targets: Vec<&Addr<NodeActor>> = self
                .routes
                .iter()
                .filter(|(r, _)| r.eq_ignore_ascii_case(&relation))
                .map(|(_, addr)| addr)
                .collect();
            match targets.as_slice() {
                [] if relation.eq_ignore_ascii_case(relation::FAILURE) => self.dead_letter(env),
                [] => drop(env),
                [only] => only.do_send(env),
                many => {
                    for addr in many {
                        addr.do_send(env.copy());
                    }
                }
            }
        }
    }

    /// Counts an output and records its debug event.
    fn observe(&self, relation: &str, env: &Envelope) {
        let failed = relation.eq_ignore_ascii_case(relation::FAILURE);
        if failed {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.count_out(relation);
        if (failed && self.debug.failures) || self.debug.all_now() {
            let error = failed
                .then(|| env.msg.metadata.get("error").cloned())
                .flatten();
            self.services.debug.record(
                &self.info,
                debug::Direction::Out(relation),
                &env.msg,
                error.as_deref(),
            );
        }
    }

    /// Keeps a failed message in the dead-letter table; its ticket is held
    /// until the row is committed.
    fn dead_letter(&mut self, env: Envelope) {
        let error = env
            .msg
            .metadata
            .get("error")
            .cloned()
            .unwrap_or_else(|| "routed to Failure".into());
        let source = env.ticket.source();
        let info = &self.info;
        let log = self.failure_log.allow(std::time::Instant::now(), |held_back| {
            tracing::error!(
                chain = %info.chain, node = %info.label, messages = held_back,
                "more messages failed with no Failure connection and were kept as dead letters, not logged one by one (see shardflow dlq list)"
            );
        });
        if log {
            tracing::error!(
                chain = %self.info.chain,
                node = %self.info.label,
                integration = %source.integration,
                stream = %source.stream,
                shard = %source.shard,
                sequence_number = %source.sequence_number,
                msg_type = %env.msg.msg_type,
                error = %error,
                "message failed with no Failure connection; kept as a dead letter"
            );
        }
        let write = Write::dead_letter(
            source,
            error,
            Some(self.info.chain.to_string()),
            Some(self.info.label.clone()),
            serde_json::to_string(&env.msg).ok(),
        );
        if let Err(e) = self.services.store.submit(vec![write], Some(env.ticket)) {
            tracing::error!(chain = %self.info.chain, error = %e, "dead letter not stored");
        }
    }
}

/// A running chain: its node actors, entered through the first node, and
/// their counts.
pub struct RuleEngine {
    pub def: ChainDef,
    /// The version of the set whose load started these actors.
    pub version: u64,
    first: Addr<NodeActor>,
    /// Counts by node index (position in the export).
    pub stats: Vec<Arc<NodeStats>>,
    retired: Arc<AtomicBool>,
}

impl RuleEngine {
    /// Starts one actor per node, spread over `arbiters`, wired as the
    /// chain's edges say.
    pub fn start(
        def: ChainDef,
        version: u64,
        services: Services,
        arbiters: &[ArbiterHandle],
    ) -> RuleEngine {
        let chain: Arc<str> = Arc::from(def.name.as_str());
        let retired = Arc::new(AtomicBool::new(false));
        let stats: Vec<Arc<NodeStats>> = (0..def.graph.node_count())
            .map(|_| Arc::default())
            .collect();
        // Successors are started before the nodes that send to them.
        let order =
            petgraph::algo::toposort(&def.graph, None).expect("validated chains are acyclic");
        let mut addrs: HashMap<petgraph::graph::NodeIndex, Addr<NodeActor>> = HashMap::new();
        for (n, index) in order.into_iter().rev().enumerate() {
            let node = &def.graph[index];
            let routes = def
                .graph
                .edges(index)
                .map(|edge| (edge.weight().clone(), addrs[&edge.target()].clone()))
                .collect();
            let actor = NodeActor {
                info: NodeInfo {
                    chain: chain.clone(),
                    name: node.name.clone(),
                    label: node.label(),
                    last: def.graph.edges(index).next().is_none(),
                },
                kind: node.kind.clone(),
                debug: node.debug,
                services: services.clone(),
                stats: stats[index.index()].clone(),
                retired: retired.clone(),
                routes,
                ticking: false,
                failure_log: Default::default(),
            };
            let arbiter = &arbiters[n % arbiters.len()];
            addrs.insert(index, NodeActor::start_in_arbiter(arbiter, move |_| actor));
        }
        RuleEngine {
            first: addrs[&def.first].clone(),
            def,
            version,
            stats,
            retired,
        }
    }

    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// Hands a message to the chain's first node. Messages from one sender
    /// keep their order.
    pub fn enter(&self, env: Envelope) {
        self.first.do_send(env);
    }
}

impl Drop for RuleEngine {
    /// No set uses the chain any more: its timed nodes stop; the others
    /// stop once their last message is handled and their addresses drop.
    fn drop(&mut self) {
        self.retired.store(true, Ordering::Release);
    }
}
