//! Embedded storage: entities, telemetry, attributes, checkpoints and dead
//! letters in one SQLite file.
//!
//! Writes go through one writer thread that owns the write connection. It
//! takes whatever jobs are queued, applies them in one transaction and
//! commits with `synchronous = FULL`, then answers each job and drops the
//! delivery tickets it held: a ticket is released only after its data is on
//! disk. Jobs are applied in the order they were sent. Reads use their own
//! connection (WAL lets them run beside the writer). Storage knows nothing
//! of rules or streams. What each commit changed is announced on a
//! broadcast channel ([`Store::subscribe`]) for live pages.

mod value;
mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use uuid::Uuid;

use crate::delivery::Ticket;
use crate::msg::{EntityId, EntityType};
pub use value::KvValue;
pub use writer::{Changes, FailureTarget, Write};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another shardflow instance is using the data directory {0} (lock file held); \
         stop it or choose another data_dir"
    )]
    Locked(PathBuf),
    #[error("the store writer has stopped")]
    WriterGone,
    #[error("{0}")]
    Invalid(String),
}

/// Attribute scopes, as ThingsBoard names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Scope {
    #[serde(rename = "CLIENT_SCOPE")]
    Client,
    #[serde(rename = "SERVER_SCOPE")]
    Server,
    #[serde(rename = "SHARED_SCOPE")]
    Shared,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Client => "CLIENT_SCOPE",
            Scope::Server => "SERVER_SCOPE",
            Scope::Shared => "SHARED_SCOPE",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "CLIENT_SCOPE" => Some(Scope::Client),
            "SERVER_SCOPE" => Some(Scope::Server),
            "SHARED_SCOPE" => Some(Scope::Shared),
            _ => None,
        }
    }

    pub const ALL: [Scope; 3] = [Scope::Client, Scope::Server, Scope::Shared];
}

/// What a commit changed, announced after the commit. Values are not
/// included: a listener reads them through the usual queries.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Change {
    #[serde(rename_all = "camelCase")]
    EntityCreated {
        entity_type: EntityType,
        entity_id: Uuid,
        name: String,
    },
    #[serde(rename_all = "camelCase")]
    Telemetry { entity_id: Uuid, keys: Vec<String> },
    #[serde(rename_all = "camelCase")]
    Attributes {
        entity_id: Uuid,
        scope: Scope,
        keys: Vec<String>,
        /// True when the keys were deleted.
        deleted: bool,
    },
}

impl Change {
    /// The entity the change is about.
    pub fn entity_id(&self) -> Uuid {
        match self {
            Change::EntityCreated { entity_id, .. }
            | Change::Telemetry { entity_id, .. }
            | Change::Attributes { entity_id, .. } => *entity_id,
        }
    }

    /// Adds the keys of `other` (a change of the same kind) to these.
    fn merge_keys(&mut self, other: Change) {
        if let (
            Change::Telemetry { keys, .. } | Change::Attributes { keys, .. },
            Change::Telemetry { keys: more, .. } | Change::Attributes { keys: more, .. },
        ) = (self, other)
        {
            for key in more {
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
    }
}

/// Commits buffered for slow listeners before they miss some.
const CHANGE_BACKLOG: usize = 256;

/// A device or an asset.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub id: EntityId,
    pub name: String,
    /// The device type (ThingsBoard's profile name).
    pub profile: String,
    pub label: Option<String>,
    pub customer_name: Option<String>,
    pub group_name: Option<String>,
    pub created_time: i64,
}

/// What is known of an entity when it is first seen.
#[derive(Debug, Clone, Copy)]
pub struct EntityDraft<'a> {
    pub entity_type: EntityType,
    pub name: &'a str,
    pub profile: &'a str,
    pub label: Option<&'a str>,
    pub customer_name: Option<&'a str>,
    pub group_name: Option<&'a str>,
}

/// A stored value with its timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct TsValue {
    pub key: String,
    pub ts: i64,
    pub value: KvValue,
}

/// A shard's stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub sequence_number: Option<String>,
    /// Set when the checkpoint falls inside a KPL aggregate: the last done
    /// user record's sub-sequence number. A restart re-reads the aggregate
    /// and skips its user records up to this one.
    pub sub_sequence_number: Option<u64>,
    /// When the checkpoint's record arrived in the stream (epoch ms), to
    /// tell whether the records after it may have expired unread.
    pub arrival_ms: Option<i64>,
    /// When the checkpoint was written (epoch ms).
    pub updated_ms: i64,
    pub shard_end: bool,
    /// When a shard first started at LATEST (epoch ms), kept until its
    /// first checkpoint, so a restart before then resumes from that time.
    pub latest_from_ms: Option<i64>,
}

/// A record or message that could not be processed, kept with its bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub created_ms: i64,
    pub integration: String,
    pub stream: String,
    pub shard: String,
    pub sequence_number: String,
    /// For a user record of a KPL aggregate, its sub-sequence number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_sequence_number: Option<u64>,
    pub partition_key: String,
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub error: String,
    pub chain: Option<String>,
    pub node: Option<String>,
    /// The rule-engine message, as JSON, when the failure was in the chain.
    pub message: Option<String>,
    /// When the record was replayed successfully, if it was.
    pub replayed_ms: Option<i64>,
    /// The record's ApproximateArrivalTimestamp.
    pub arrival_ms: i64,
}

/// A rule node's debug event: a message in or out of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DebugEvent {
    pub id: i64,
    pub ts: i64,
    pub chain: String,
    pub node: String,
    /// `IN` or `OUT`.
    pub direction: String,
    /// The relation an `OUT` event took.
    pub relation: Option<String>,
    pub msg_id: String,
    pub msg_type: String,
    pub originator: String,
    pub data: String,
    /// The message metadata, as a JSON object.
    pub metadata: String,
    pub error: Option<String>,
}

/// Which debug events to read.
#[derive(Debug, Clone, Default)]
pub struct DebugEventFilter {
    /// Only those of this chain (by name).
    pub chain: Option<String>,
    /// Only those whose node label contains this text.
    pub node: Option<String>,
    pub limit: usize,
}

/// Which dead letters to read.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    /// Only these ids (all when empty).
    pub ids: Vec<i64>,
    /// Only those stored at or after this time (epoch ms).
    pub since_ms: Option<i64>,
    /// Leave out those already replayed.
    pub unreplayed_only: bool,
    pub limit: usize,
}

/// The store: a writer thread and a read connection over one file.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::UnboundedSender<writer::Job>,
    reader: Arc<Mutex<Connection>>,
    entities: Arc<Mutex<EntityCache>>,
    path: PathBuf,
    writable: Arc<std::sync::atomic::AtomicBool>,
    changes: broadcast::Sender<Changes>,
    /// Dropped with the last clone of the store; ends the checkpointer.
    _alive: Arc<()>,
}

/// Holds the data directory's lock for as long as it lives.
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock of `dir`, creating it if needed. A second instance on
    /// the same directory gets [`StoreError::Locked`].
    pub fn acquire(dir: &Path) -> Result<DataDirLock, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("shardflow.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::DataDir {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(DataDirLock { _file: file }),
            Err(_) => Err(StoreError::Locked(dir.to_path_buf())),
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entities (
    id TEXT PRIMARY KEY,
    entity_type TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    label TEXT,
    customer_name TEXT,
    group_name TEXT,
    created_time INTEGER NOT NULL,
    UNIQUE (entity_type, name)
);
CREATE TABLE IF NOT EXISTS ts_kv (
    entity_id TEXT NOT NULL, key TEXT NOT NULL, ts INTEGER NOT NULL,
    kind INTEGER NOT NULL, long_v INTEGER, dbl_v REAL, str_v TEXT, expires_ms INTEGER,
    PRIMARY KEY (entity_id, key, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ts_kv_latest (
    entity_id TEXT NOT NULL, key TEXT NOT NULL, ts INTEGER NOT NULL,
    kind INTEGER NOT NULL, long_v INTEGER, dbl_v REAL, str_v TEXT,
    PRIMARY KEY (entity_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attributes (
    entity_id TEXT NOT NULL, scope TEXT NOT NULL, key TEXT NOT NULL,
    last_update_ts INTEGER NOT NULL,
    kind INTEGER NOT NULL, long_v INTEGER, dbl_v REAL, str_v TEXT,
    PRIMARY KEY (entity_id, scope, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    application TEXT NOT NULL, stream TEXT NOT NULL, shard TEXT NOT NULL,
    sequence_number TEXT, shard_end INTEGER NOT NULL DEFAULT 0,
    updated_ms INTEGER NOT NULL, latest_from_ms INTEGER,
    sub_sequence_number INTEGER, arrival_ms INTEGER,
    PRIMARY KEY (application, stream, shard)
);
CREATE TABLE IF NOT EXISTS streams (
    application TEXT NOT NULL, stream TEXT NOT NULL, created_ms INTEGER NOT NULL,
    PRIMARY KEY (application, stream)
);
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY, created_ms INTEGER NOT NULL, message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS debug_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts INTEGER NOT NULL, chain TEXT NOT NULL, node TEXT NOT NULL,
    direction TEXT NOT NULL, relation TEXT,
    msg_id TEXT NOT NULL, msg_type TEXT NOT NULL, originator TEXT NOT NULL,
    data TEXT NOT NULL, metadata TEXT NOT NULL, error TEXT
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ms INTEGER NOT NULL,
    integration TEXT NOT NULL, stream TEXT NOT NULL, shard TEXT NOT NULL,
    sequence_number TEXT NOT NULL, partition_key TEXT NOT NULL,
    payload BLOB NOT NULL, error TEXT NOT NULL,
    chain TEXT, node TEXT, message TEXT,
    replayed_ms INTEGER, arrival_ms INTEGER, sub_sequence_number INTEGER
);
";

/// `ALTER TABLE <column>`, where a column that is already there is fine.
fn add_column(conn: &Connection, column: &str) -> Result<(), StoreError> {
    match conn.execute_batch(&format!("ALTER TABLE {column}")) {
        Err(rusqlite::Error::SqliteFailure(_, Some(message)))
            if message.contains("duplicate column name") =>
        {
            Ok(())
        }
        other => Ok(other?),
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

impl Store {
    /// Opens (or creates) `shardflow.db` in `dir` and starts the writer.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("shardflow.db");
        let write_conn = open_connection(&path)?;
        // A larger page cache for the writer (without it, it spends a fifth
        // of its time re-reading pages), and WAL checkpoints moved off the
        // write path to a thread of their own, so commits never wait for
        // one.
        write_conn.pragma_update(None, "cache_size", -8_192)?;
        write_conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        write_conn.execute_batch(SCHEMA)?;
        let alive = Arc::new(());
        spawn_checkpointer(open_connection(&path)?, Arc::downgrade(&alive));
        // Databases made before dead letters could be replayed.
        let _ = write_conn.execute_batch("ALTER TABLE dead_letters ADD COLUMN replayed_ms INTEGER");
        let _ = write_conn.execute_batch("ALTER TABLE dead_letters ADD COLUMN arrival_ms INTEGER");
        let _ =
            write_conn.execute_batch("ALTER TABLE checkpoints ADD COLUMN latest_from_ms INTEGER");
        // Databases made before telemetry could expire.
        let _ = write_conn.execute_batch("ALTER TABLE ts_kv ADD COLUMN expires_ms INTEGER");
        write_conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS ts_kv_expiry ON ts_kv (expires_ms) WHERE expires_ms IS NOT NULL",
        )?;
        // Databases made before KPL aggregates were taken apart and before
        // retention gaps were told.
        for column in [
            "checkpoints ADD COLUMN sub_sequence_number INTEGER",
            "checkpoints ADD COLUMN arrival_ms INTEGER",
            "dead_letters ADD COLUMN sub_sequence_number INTEGER",
        ] {
            add_column(&write_conn, column)?;
        }
        let reader = open_connection(&path)?;
        let entities = load_entities(&reader)?;
        let writable = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (changes, _) = broadcast::channel(CHANGE_BACKLOG);
        let jobs = writer::spawn(write_conn, writable.clone(), changes.clone());
        Ok(Store {
            jobs,
            reader: Arc::new(Mutex::new(reader)),
            entities: Arc::new(Mutex::new(entities)),
            path,
            writable,
            changes,
            _alive: alive,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// False while commits fail (disk full, I/O errors); writes wait.
    pub fn is_writable(&self) -> bool {
        self.writable.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Announcements of what each commit changed, from now on. A receiver
    /// that falls more than a few hundred commits behind gets
    /// `RecvError::Lagged` and should read again what it shows.
    pub fn subscribe(&self) -> broadcast::Receiver<Changes> {
        self.changes.subscribe()
    }

    /// Queues writes; the ticket is held until they are committed.
    pub fn submit(&self, writes: Vec<Write>, ticket: Option<Ticket>) -> Result<(), StoreError> {
        self.jobs
            .send(writer::Job {
                writes,
                reply: None,
                ticket,
                dead_letter_on_failure: None,
            })
            .map_err(|_| StoreError::WriterGone)
    }

    /// Queues the writes of a rule node that has nothing after it: no
    /// answer is needed, the ticket is held until they are committed, and
    /// if they fail the message is kept as a dead letter instead.
    pub fn submit_final(
        &self,
        writes: Vec<Write>,
        ticket: Ticket,
        target: FailureTarget,
    ) -> Result<(), StoreError> {
        self.jobs
            .send(writer::Job {
                writes,
                reply: None,
                ticket: Some(ticket),
                dead_letter_on_failure: Some(target),
            })
            .map_err(|_| StoreError::WriterGone)
    }

    /// Writes and waits until they are committed.
    pub async fn write(
        &self,
        writes: Vec<Write>,
        ticket: Option<Ticket>,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(writer::Job {
                writes,
                reply: Some(reply),
                ticket,
                dead_letter_on_failure: None,
            })
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Finds an entity by type and name, or creates it. Returns the entity
    /// and whether it is new; a new entity's row is queued with `ticket`.
    pub fn ensure_entity(
        &self,
        draft: EntityDraft<'_>,
        ticket: Option<Ticket>,
    ) -> Result<(Entity, bool), StoreError> {
        let mut entities = self.entities.lock().expect("entity cache lock");
        if let Some(entity) = entities.by_name(draft.entity_type, draft.name) {
            return Ok((entity.clone(), false));
        }
        let entity = Entity {
            id: EntityId {
                entity_type: draft.entity_type,
                id: Uuid::new_v4(),
            },
            name: draft.name.to_string(),
            profile: draft.profile.to_string(),
            label: draft.label.map(str::to_string),
            customer_name: draft.customer_name.map(str::to_string),
            group_name: draft.group_name.map(str::to_string),
            created_time: crate::msg::now_millis(),
        };
        // Queued while the cache lock is held, so the row is committed
        // before any write that refers to the entity.
        self.submit(vec![Write::Entity(entity.clone())], ticket)?;
        entities.insert(entity.clone());
        Ok((entity, true))
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.reader.lock().expect("reader lock");
        Ok(f(&conn)?)
    }

    pub fn entity(&self, id: Uuid) -> Result<Option<Entity>, StoreError> {
        let cached = self.entities.lock().expect("entity cache lock");
        Ok(cached.by_id.get(&id).cloned())
    }

    pub fn entity_by_name(&self, entity_type: EntityType, name: &str) -> Option<Entity> {
        let cached = self.entities.lock().expect("entity cache lock");
        cached.by_name(entity_type, name).cloned()
    }

    /// Committed entities of a type whose name contains `text_search`,
    /// sorted by name.
    pub fn entities(
        &self,
        entity_type: EntityType,
        text_search: Option<&str>,
    ) -> Result<Vec<Entity>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, entity_type, name, type, label, customer_name, group_name, created_time
                 FROM entities WHERE entity_type = ?1 AND (?2 IS NULL OR instr(lower(name), lower(?2)) > 0)
                 ORDER BY name",
            )?;
            let rows = stmt.query_map(params![entity_type.as_str(), text_search], entity_row)?;
            rows.collect()
        })
    }

    /// Latest telemetry of an entity; all keys when `keys` is empty.
    pub fn latest(&self, entity: EntityId, keys: &[String]) -> Result<Vec<TsValue>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT key, ts, kind, long_v, dbl_v, str_v FROM ts_kv_latest WHERE entity_id = ?1 ORDER BY key",
            )?;
            let rows = stmt.query_map(params![entity.id.to_string()], ts_value_row)?;
            let all: Vec<TsValue> = rows.collect::<rusqlite::Result<_>>()?;
            Ok(filter_keys(all, keys))
        })
    }

    /// Telemetry history of one key between `start` and `end` inclusive,
    /// newest first, at most `limit` values.
    pub fn history(
        &self,
        entity: EntityId,
        key: &str,
        start: i64,
        end: i64,
        limit: usize,
    ) -> Result<Vec<TsValue>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT key, ts, kind, long_v, dbl_v, str_v FROM ts_kv
                 WHERE entity_id = ?1 AND key = ?2 AND ts BETWEEN ?3 AND ?4 ORDER BY ts DESC LIMIT ?5",
            )?;
            let rows = stmt.query_map(
                params![entity.id.to_string(), key, start, end, limit as i64],
                ts_value_row,
            )?;
            rows.collect()
        })
    }

    /// Number of stored telemetry points of an entity.
    pub fn history_count(&self, entity: EntityId) -> Result<i64, StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT count(*) FROM ts_kv WHERE entity_id = ?1",
                params![entity.id.to_string()],
                |row| row.get(0),
            )
        })
    }

    pub fn attributes(
        &self,
        entity: EntityId,
        scope: Scope,
        keys: &[String],
    ) -> Result<Vec<TsValue>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT key, last_update_ts, kind, long_v, dbl_v, str_v FROM attributes
                 WHERE entity_id = ?1 AND scope = ?2 ORDER BY key",
            )?;
            let rows =
                stmt.query_map(params![entity.id.to_string(), scope.as_str()], ts_value_row)?;
            let all: Vec<TsValue> = rows.collect::<rusqlite::Result<_>>()?;
            Ok(filter_keys(all, keys))
        })
    }

    pub fn checkpoint(
        &self,
        application: &str,
        stream: &str,
        shard: &str,
    ) -> Result<Option<Checkpoint>, StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT sequence_number, shard_end, latest_from_ms, sub_sequence_number,
                        arrival_ms, updated_ms
                 FROM checkpoints WHERE application = ?1 AND stream = ?2 AND shard = ?3",
                params![application, stream, shard],
                |row| {
                    Ok(Checkpoint {
                        sequence_number: row.get(0)?,
                        shard_end: row.get::<_, i64>(1)? != 0,
                        latest_from_ms: row.get(2)?,
                        sub_sequence_number: row.get::<_, Option<i64>>(3)?.map(|n| n as u64),
                        arrival_ms: row.get(4)?,
                        updated_ms: row.get(5)?,
                    })
                },
            )
            .optional()
        })
    }

    /// The creation time of the stream the checkpoints of (application,
    /// stream) were taken on.
    pub fn stream_created_ms(
        &self,
        application: &str,
        stream: &str,
    ) -> Result<Option<i64>, StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT created_ms FROM streams WHERE application = ?1 AND stream = ?2",
                params![application, stream],
                |row| row.get(0),
            )
            .optional()
        })
    }

    pub fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
        let ids = filter
            .ids
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, created_ms, integration, stream, shard, sequence_number, partition_key,
                        payload, error, chain, node, message, replayed_ms,
                        coalesce(arrival_ms, created_ms), sub_sequence_number
                 FROM dead_letters
                 WHERE (?1 = '' OR instr(',' || ?1 || ',', ',' || id || ',') > 0)
                   AND (?2 IS NULL OR created_ms >= ?2)
                   AND (?3 = 0 OR replayed_ms IS NULL)
                 ORDER BY id LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![
                    ids,
                    filter.since_ms,
                    filter.unreplayed_only as i64,
                    filter.limit as i64
                ],
                |row| {
                    Ok(DeadLetter {
                        id: row.get(0)?,
                        created_ms: row.get(1)?,
                        integration: row.get(2)?,
                        stream: row.get(3)?,
                        shard: row.get(4)?,
                        sequence_number: row.get(5)?,
                        partition_key: row.get(6)?,
                        payload: row.get(7)?,
                        error: row.get(8)?,
                        chain: row.get(9)?,
                        node: row.get(10)?,
                        message: row.get(11)?,
                        replayed_ms: row.get(12)?,
                        arrival_ms: row.get(13)?,
                        sub_sequence_number: row.get::<_, Option<i64>>(14)?.map(|n| n as u64),
                    })
                },
            )?;
            rows.collect()
        })
    }

    /// Drops dead letters beyond a count (oldest first) and older than an
    /// age (through the writer); returns how many were dropped. 0 means no
    /// limit.
    pub async fn trim_dead_letters(
        &self,
        max_count: u64,
        max_age_ms: i64,
    ) -> Result<i64, StoreError> {
        let total = |store: &Store| {
            store.read(|conn| {
                conn.query_row("SELECT count(*) FROM dead_letters", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
        };
        let before = total(self)?;
        let write = Write::TrimDeadLetters {
            max_count,
            max_age_ms,
        };
        self.write(vec![write], None).await?;
        Ok(before - total(self)?)
    }

    /// Outbox messages not done yet, oldest first: (id, message JSON).
    pub fn outbox(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare("SELECT id, message FROM outbox ORDER BY created_ms, id")?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })
    }

    /// Debug events, newest first.
    pub fn debug_events(&self, filter: &DebugEventFilter) -> Result<Vec<DebugEvent>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, ts, chain, node, direction, relation, msg_id, msg_type, originator,
                        data, metadata, error
                 FROM debug_events
                 WHERE (?1 IS NULL OR chain = ?1) AND (?2 IS NULL OR instr(node, ?2) > 0)
                 ORDER BY id DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![filter.chain, filter.node, filter.limit as i64],
                |row| {
                    Ok(DebugEvent {
                        id: row.get(0)?,
                        ts: row.get(1)?,
                        chain: row.get(2)?,
                        node: row.get(3)?,
                        direction: row.get(4)?,
                        relation: row.get(5)?,
                        msg_id: row.get(6)?,
                        msg_type: row.get(7)?,
                        originator: row.get(8)?,
                        data: row.get(9)?,
                        metadata: row.get(10)?,
                        error: row.get(11)?,
                    })
                },
            )?;
            rows.collect()
        })
    }

    /// Dead letters not replayed yet, by integration.
    pub fn dead_letter_counts(&self) -> Result<HashMap<String, i64>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT integration, count(*) FROM dead_letters WHERE replayed_ms IS NULL
                 GROUP BY integration",
            )?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })
    }

    /// Deletes history values whose TTL has passed, in slices so other
    /// writes are not held up; returns how many were deleted.
    pub async fn purge_expired_telemetry(&self, now_ms: i64) -> Result<i64, StoreError> {
        const SLICE: i64 = 5_000;
        let expired = |store: &Store| {
            store.read(|conn| {
                conn.query_row(
                    "SELECT count(*) FROM ts_kv WHERE expires_ms < ?1",
                    params![now_ms],
                    |r| r.get::<_, i64>(0),
                )
            })
        };
        let before = expired(self)?;
        let mut left = before;
        while left > 0 {
            let write = Write::PurgeExpiredTelemetry {
                now_ms,
                limit: SLICE,
            };
            self.write(vec![write], None).await?;
            let now = expired(self)?;
            if now >= left {
                break;
            }
            left = now;
        }
        Ok(before - left)
    }

    /// Dead letters not replayed yet.
    pub fn dead_letter_count(&self) -> Result<i64, StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT count(*) FROM dead_letters WHERE replayed_ms IS NULL",
                [],
                |row| row.get(0),
            )
        })
    }

    /// Waits until everything queued before this call is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.write(Vec::new(), None).await
    }
}

/// Copies the WAL into the database file in the background (PASSIVE: it
/// never blocks the writer or readers), so the WAL stays small.
/// It stops once the store is dropped.
fn spawn_checkpointer(conn: Connection, alive: std::sync::Weak<()>) {
    let spawned = std::thread::Builder::new()
        .name("store-checkpointer".into())
        .spawn(move || {
            while alive.strong_count() > 0 {
                std::thread::sleep(std::time::Duration::from_millis(500));
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the WAL checkpointer");
    }
}

fn filter_keys(values: Vec<TsValue>, keys: &[String]) -> Vec<TsValue> {
    if keys.is_empty() {
        return values;
    }
    values
        .into_iter()
        .filter(|v| keys.contains(&v.key))
        .collect()
}

fn ts_value_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TsValue> {
    Ok(TsValue {
        key: row.get(0)?,
        ts: row.get(1)?,
        value: KvValue::from_columns(row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?),
    })
}

fn entity_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Entity> {
    let id: String = row.get(0)?;
    let entity_type: String = row.get(1)?;
    Ok(Entity {
        id: EntityId {
            entity_type: EntityType::parse(&entity_type).unwrap_or(EntityType::Device),
            id: Uuid::parse_str(&id).unwrap_or_default(),
        },
        name: row.get(2)?,
        profile: row.get(3)?,
        label: row.get(4)?,
        customer_name: row.get(5)?,
        group_name: row.get(6)?,
        created_time: row.get(7)?,
    })
}

/// Every entity, by id and by (type, name): looked up per record and per
/// API call without a query and without building a key.
#[derive(Default)]
struct EntityCache {
    by_id: HashMap<Uuid, Entity>,
    devices: HashMap<String, Uuid>,
    assets: HashMap<String, Uuid>,
    /// The tenant is no stored entity; no name finds it.
    none: HashMap<String, Uuid>,
}

impl EntityCache {
    fn names(&self, entity_type: EntityType) -> &HashMap<String, Uuid> {
        match entity_type {
            EntityType::Device => &self.devices,
            EntityType::Asset => &self.assets,
            EntityType::Tenant => &self.none,
        }
    }

    fn by_name(&self, entity_type: EntityType, name: &str) -> Option<&Entity> {
        self.names(entity_type)
            .get(name)
            .and_then(|id| self.by_id.get(id))
    }

    fn insert(&mut self, entity: Entity) {
        let names = match entity.id.entity_type {
            EntityType::Device => &mut self.devices,
            EntityType::Asset => &mut self.assets,
            EntityType::Tenant => return,
        };
        names.insert(entity.name.clone(), entity.id.id);
        self.by_id.insert(entity.id.id, entity);
    }
}

fn load_entities(conn: &Connection) -> Result<EntityCache, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, entity_type, name, type, label, customer_name, group_name, created_time FROM entities",
    )?;
    let rows = stmt.query_map([], entity_row)?;
    let mut cache = EntityCache::default();
    for entity in rows {
        cache.insert(entity?);
    }
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database made before checkpoints carried sub-sequence numbers and
    /// arrival times, and before dead letters carried sub-sequence numbers.
    #[tokio::test]
    async fn databases_from_before_kpl_checkpoints_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(dir.path().join("shardflow.db")).unwrap();
            old.execute_batch(
                "CREATE TABLE checkpoints (
                    application TEXT NOT NULL, stream TEXT NOT NULL, shard TEXT NOT NULL,
                    sequence_number TEXT, shard_end INTEGER NOT NULL DEFAULT 0,
                    updated_ms INTEGER NOT NULL, latest_from_ms INTEGER,
                    PRIMARY KEY (application, stream, shard));
                 INSERT INTO checkpoints VALUES ('app', 's', 'shard-0', '42', 0, 1000, NULL);
                 CREATE TABLE dead_letters (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, created_ms INTEGER NOT NULL,
                    integration TEXT NOT NULL, stream TEXT NOT NULL, shard TEXT NOT NULL,
                    sequence_number TEXT NOT NULL, partition_key TEXT NOT NULL,
                    payload BLOB NOT NULL, error TEXT NOT NULL,
                    chain TEXT, node TEXT, message TEXT, replayed_ms INTEGER, arrival_ms INTEGER);",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let old = store.checkpoint("app", "s", "shard-0").unwrap().unwrap();
        assert_eq!(old.sequence_number.as_deref(), Some("42"));
        assert_eq!(
            (old.sub_sequence_number, old.arrival_ms, old.updated_ms),
            (None, None, 1000)
        );

        let write = Write::Checkpoint {
            application: "app".into(),
            stream: "s".into(),
            shard: "shard-0".into(),
            sequence_number: Some("43".into()),
            sub_sequence_number: Some(7),
            arrival_ms: Some(5),
            shard_end: false,
        };
        store.write(vec![write], None).await.unwrap();
        let new = store.checkpoint("app", "s", "shard-0").unwrap().unwrap();
        assert_eq!(new.sub_sequence_number, Some(7));
        assert_eq!(new.arrival_ms, Some(5));

        let source = crate::delivery::SourceRecord {
            sequence_number: "43".into(),
            sub_sequence_number: Some(7),
            ..Default::default()
        };
        let letter = Write::dead_letter(&source, "bad".into(), None, None, None);
        store.write(vec![letter], None).await.unwrap();
        let letters = store
            .dead_letters(&DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(letters[0].sub_sequence_number, Some(7));
        drop(store);
        // Opening it again finds the columns there.
        Store::open(dir.path()).unwrap();
    }
}
