//! The rule engine: a chain loaded from ThingsBoard's export format, run as
//! one actix actor per rule node.
//!
//! Messages travel the chain's edges by relation name (case-insensitive).
//! Several matching edges each get a copy. A message whose relation has no
//! edge is done, except `Failure`: it is logged at ERROR and kept in the
//! dead-letter table, so nothing is dropped silently. The engine reaches
//! storage and converters through [`Services`] and knows nothing of HTTP
//! or Kinesis.

pub mod loader;
pub mod nodes;

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use futures::future::BoxFuture;
use petgraph::visit::EdgeRef;

use crate::convert::{ConverterWorker, DownlinkRecord, Script};
use crate::delivery::Ticket;
use crate::msg::{relation, TbMsg};
use crate::store::{Store, Write};
pub use loader::{ChainDef, ChainError};
use nodes::{NodeInfo, NodeKind, NodeOutput};

/// A message on its way through the chain, with its delivery ticket.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Envelope {
    pub msg: TbMsg,
    pub ticket: Ticket,
}

/// Sends downlink records somewhere (a Kinesis stream).
pub trait DownlinkSender: Send + Sync {
    fn send(&self, records: Vec<DownlinkRecord>) -> BoxFuture<'static, Result<(), String>>;
}

/// An integration's downlink path.
#[derive(Clone)]
pub struct DownlinkTarget {
    pub integration: String,
    pub encoder: Arc<Script>,
    pub sender: Arc<dyn DownlinkSender>,
}

/// What rule nodes may use.
#[derive(Clone)]
pub struct Services {
    pub store: Store,
    pub js: Addr<ConverterWorker>,
    /// Downlink paths by integration name.
    pub downlinks: HashMap<String, DownlinkTarget>,
}

impl Services {
    /// The downlink path of an integration named (or with the id) `key`;
    /// an empty key means the only integration with a downlink converter.
    pub fn downlink(&self, key: &str) -> Result<DownlinkTarget, String> {
        if key.is_empty() {
            let mut all = self.downlinks.values();
            return match (all.next(), all.next()) {
                (Some(only), None) => Ok(only.clone()),
                (None, _) => Err("no integration has a downlink converter".into()),
                _ => Err("integrationId is empty but several integrations have downlink converters; name one".into()),
            };
        }
        self.downlinks.get(key).cloned().ok_or_else(|| {
            format!("integration {key:?} is not configured or has no downlink converter")
        })
    }
}

/// One rule node as an actor.
pub struct NodeActor {
    chain: Arc<str>,
    info: NodeInfo,
    label: String,
    kind: NodeKind,
    services: Services,
    /// Outgoing edges: (relation, next node).
    routes: Vec<(String, Addr<NodeActor>)>,
}

impl Actor for NodeActor {
    type Context = Context<Self>;
}

impl Handler<Envelope> for NodeActor {
    type Result = ();

    fn handle(&mut self, env: Envelope, ctx: &mut Context<Self>) {
        match self.kind.process(env, &self.services, &self.info) {
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
}

/// The outputs of a node's asynchronous work, to be routed.
#[derive(Message)]
#[rtype(result = "()")]
struct Finished(Vec<(String, Envelope)>);

impl Handler<Finished> for NodeActor {
    type Result = ();

    fn handle(&mut self, Finished(outputs): Finished, _: &mut Context<Self>) {
        self.route(outputs);
    }
}

impl NodeActor {
    fn route(&self, outputs: Vec<(String, Envelope)>) {
        for (relation, env) in outputs {
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
                        addr.do_send(Envelope {
                            msg: env.msg.copy(),
                            ticket: env.ticket.clone(),
                        });
                    }
                }
            }
        }
    }

    /// Keeps a failed message in the dead-letter table; its ticket is held
    /// until the row is committed.
    fn dead_letter(&self, env: Envelope) {
        let error = env
            .msg
            .metadata
            .get("error")
            .cloned()
            .unwrap_or_else(|| "routed to Failure".into());
        let source = env.ticket.source();
        tracing::error!(
            chain = %self.chain,
            node = %self.label,
            integration = %source.integration,
            stream = %source.stream,
            shard = %source.shard,
            sequence_number = %source.sequence_number,
            msg_type = %env.msg.msg_type,
            error = %error,
            "message failed with no Failure connection; kept as a dead letter"
        );
        let write = Write::dead_letter(
            source,
            error,
            Some(self.chain.to_string()),
            Some(self.label.clone()),
            serde_json::to_string(&env.msg).ok(),
        );
        if let Err(e) = self.services.store.submit(vec![write], Some(env.ticket)) {
            tracing::error!(chain = %self.chain, error = %e, "dead letter not stored");
        }
    }
}

/// A running chain: its node actors, entered through the first node.
#[derive(Clone)]
pub struct RuleEngine {
    name: Arc<str>,
    first: Addr<NodeActor>,
}

impl RuleEngine {
    /// Starts one actor per node, spread over `arbiters`, wired as the
    /// chain's edges say.
    pub fn start(def: &ChainDef, services: Services, arbiters: &[ArbiterHandle]) -> RuleEngine {
        let chain: Arc<str> = Arc::from(def.name.as_str());
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
            let info = NodeInfo {
                chain: chain.clone(),
                name: node.name.clone(),
                label: node.label(),
                last: def.graph.edges(index).next().is_none(),
            };
            let actor = NodeActor {
                chain: chain.clone(),
                info,
                label: node.label(),
                kind: node.kind.clone(),
                services: services.clone(),
                routes,
            };
            let arbiter = &arbiters[n % arbiters.len()];
            addrs.insert(index, NodeActor::start_in_arbiter(arbiter, move |_| actor));
        }
        RuleEngine {
            name: chain,
            first: addrs[&def.first].clone(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hands a message to the chain's first node. Messages from one sender
    /// keep their order.
    pub fn submit(&self, msg: TbMsg, ticket: Ticket) {
        self.first.do_send(Envelope { msg, ticket });
    }
}
