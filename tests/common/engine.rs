//! An in-process rule engine for node tests: the real node actors, the real
//! QuickJS pool and a real SQLite store in a temporary directory, fed
//! messages directly. Each message's delivery ticket tells when its whole
//! path is done, so tests wait for that instead of sleeping.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use shardflow::chain::debug::DebugRecorder;
use shardflow::chain::loader::UnknownNodes;
use shardflow::chain::set::{self, SetConfig};
use shardflow::chain::{Rules, Services};
use shardflow::convert::js::JsLimits;
use shardflow::convert::ConverterWorker;
use shardflow::delivery::{CompletionSink, SourceRecord, Ticket};
use shardflow::msg::{EntityId, EntityType, TbMsg};
use shardflow::store::{Entity, EntityDraft, Store};

/// A node of a chain under test: (class name after
/// `org.thingsboard.rule.engine.`, name, configuration).
pub type Node<'a> = (&'a str, &'a str, Value);

/// A chain export with these nodes and connections `(from, to, relation)`.
pub fn chain(name: &str, nodes: &[Node<'_>], connections: &[(usize, usize, &str)]) -> String {
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|(kind, name, config)| {
            json!({"type": format!("org.thingsboard.rule.engine.{kind}"), "name": name,
                   "configuration": config})
        })
        .collect();
    let connections: Vec<Value> = connections
        .iter()
        .map(|(from, to, relation)| json!({"fromIndex": from, "toIndex": to, "type": relation}))
        .collect();
    json!({"ruleChain": {"name": name}, "metadata": {"firstNodeIndex": 0, "nodes": nodes,
           "connections": connections}})
    .to_string()
}

pub const SAVE_TIMESERIES: &str = "telemetry.TbMsgTimeseriesNode";
pub const SAVE_ATTRIBUTES: &str = "telemetry.TbMsgAttributesNode";

/// A running rule engine over a directory of chain files.
pub struct Engine {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub rules: Arc<Rules>,
}

impl Engine {
    /// Writes `chains` (file name, export) into a directory and starts
    /// them with `root.json` as the root. Must run inside an actix system.
    pub fn start(chains: &[(&str, String)]) -> Engine {
        Engine::start_with(chains, UnknownNodes::Reject)
    }

    pub fn start_with(chains: &[(&str, String)], unknown: UnknownNodes) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let chain_dir = dir.path().join("rulechains");
        std::fs::create_dir_all(&chain_dir).unwrap();
        for (file, text) in chains {
            std::fs::write(chain_dir.join(file), text).unwrap();
        }
        let limits = JsLimits {
            call_timeout: Duration::from_millis(1000),
            memory_limit_bytes: 64 << 20,
            max_result_bytes: 1 << 20,
        };
        let config = SetConfig {
            root_chain: chain_dir.join("root.json"),
            unknown_nodes: unknown,
            limits,
            converters: Vec::new(),
        };
        let source = set::load(&config, None).unwrap_or_else(|p| panic!("{p:#?}"));
        let store = Store::open(&dir.path().join("data")).unwrap();
        let arbiters: Vec<_> = (0..2).map(|_| actix::Arbiter::new().handle()).collect();
        let services = Services {
            store: store.clone(),
            js: ConverterWorker::start_pool(2, limits),
            downlinks: Default::default(),
            http: reqwest::Client::new(),
            debug: DebugRecorder::new(store.clone(), 1000),
            current: Arc::default(),
        };
        let rules = Rules::start(config, source, services, arbiters);
        Engine { dir, store, rules }
    }

    pub fn chain_dir(&self) -> PathBuf {
        self.dir.path().join("rulechains")
    }

    /// A device, created if needed.
    pub fn device(&self, name: &str) -> Entity {
        let draft = EntityDraft {
            entity_type: EntityType::Device,
            name,
            profile: "thermostat",
            label: None,
            customer_name: None,
            group_name: None,
        };
        self.store.ensure_entity(draft, None).unwrap().0
    }

    /// Sends a message into the root chain and waits until everything it
    /// led to is done; returns whether it completed normally.
    pub async fn send(&self, msg: TbMsg) -> bool {
        let (done, finished) = tokio::sync::oneshot::channel();
        let sink = Arc::new(Done(Mutex::new(Some(done))));
        let ticket = Ticket::new(0, sink, Arc::new(SourceRecord::default()));
        self.rules.current().submit(msg, ticket);
        tokio::time::timeout(Duration::from_secs(30), finished)
            .await
            .expect("the message is done within 30 s")
            .unwrap()
    }

    /// Sends telemetry-shaped `data` from `device`, as POST_TELEMETRY_REQUEST.
    pub async fn telemetry(&self, device: &Entity, data: Value) -> bool {
        self.send(message(device, "POST_TELEMETRY_REQUEST", data))
            .await
    }

    /// The latest telemetry of an entity as key -> JSON value.
    pub fn latest(&self, entity: EntityId) -> BTreeMap<String, Value> {
        self.store
            .latest(entity, &[])
            .unwrap()
            .into_iter()
            .map(|v| (v.key, v.value.to_json()))
            .collect()
    }

    pub fn attributes(
        &self,
        entity: EntityId,
        scope: shardflow::store::Scope,
    ) -> BTreeMap<String, Value> {
        self.store
            .attributes(entity, scope, &[])
            .unwrap()
            .into_iter()
            .map(|v| (v.key, v.value.to_json()))
            .collect()
    }

    /// Dead letters' errors, oldest first.
    pub fn dead_letter_errors(&self) -> Vec<String> {
        self.store
            .dead_letters(&shardflow::store::DeadLetterFilter {
                limit: 1000,
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .map(|d| d.error)
            .collect()
    }
}

/// A message from `entity` with the metadata ThingsBoard's integrations set.
pub fn message(entity: &Entity, msg_type: &str, data: Value) -> TbMsg {
    let mut metadata = BTreeMap::new();
    metadata.insert("deviceName".to_string(), entity.name.clone());
    metadata.insert("deviceType".to_string(), entity.profile.clone());
    TbMsg::new(
        msg_type,
        entity.id,
        metadata,
        data.to_string(),
        shardflow::msg::now_millis(),
    )
}

struct Done(Mutex<Option<tokio::sync::oneshot::Sender<bool>>>);

impl CompletionSink for Done {
    fn complete(&self, _: u64, ok: bool) {
        if let Some(done) = self.0.lock().unwrap().take() {
            let _ = done.send(ok);
        }
    }
}
