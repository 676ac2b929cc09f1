//! The store's writer thread: batches queued jobs into transactions.
//!
//! A failure that a retry can cure (disk full, I/O error, a locked file)
//! rolls the batch back and retries it after a pause, holding every ticket
//! so no checkpoint moves meanwhile. A failure caused by one job's content
//! fails that job alone (it is applied inside a savepoint) and the rest of
//! the batch commits.
//!
//! After each commit the writer announces what changed (see [`Change`]) on
//! a broadcast channel, for live pages. Sending never waits: a listener too
//! slow to keep up misses changes and is told so (it then reads again), and
//! with no listener nothing is even built.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{Change, Entity, KvValue, Scope, StoreError};
use crate::delivery::{SourceRecord, Ticket};
use crate::msg::{EntityId, TbMsg};

/// One change to the store.
#[derive(Debug, Clone)]
pub enum Write {
    Entity(Entity),
    Telemetry {
        entity: EntityId,
        ts: i64,
        values: Vec<(String, KvValue)>,
        /// When the history values may be purged (epoch ms); `None` keeps
        /// them.
        expires_ms: Option<i64>,
        /// Whether the latest values are updated too.
        latest: bool,
    },
    Attributes {
        entity: EntityId,
        scope: Scope,
        ts: i64,
        values: Vec<(String, KvValue)>,
    },
    /// Deletes attributes of a scope by key.
    DeleteAttributes {
        entity: EntityId,
        scope: Scope,
        keys: Vec<String>,
    },
    /// Deletes up to `limit` history values that expired before `now_ms`.
    PurgeExpiredTelemetry {
        now_ms: i64,
        limit: i64,
    },
    DebugEvent(super::DebugEvent),
    /// A message from the API waiting to be done (see `crate::outbox`).
    Outbox {
        id: String,
        message: String,
    },
    /// The outbox message is done.
    OutboxDone {
        id: String,
    },
    /// Keeps the newest `max_count` debug events.
    TrimDebugEvents {
        max_count: u64,
    },
    Checkpoint {
        application: String,
        stream: String,
        shard: String,
        sequence_number: Option<String>,
        /// Inside a KPL aggregate: the last done user record.
        sub_sequence_number: Option<u64>,
        /// When the checkpoint's record arrived (epoch ms).
        arrival_ms: Option<i64>,
        shard_end: bool,
    },
    /// Records the time a shard without checkpoint started at LATEST.
    LatestFrom {
        application: String,
        stream: String,
        shard: String,
        from_ms: i64,
    },
    /// Marks a dead letter as replayed.
    DeadLetterReplayed {
        id: i64,
    },
    /// Deletes dead letters: the ids given, or all stored before a time,
    /// or all.
    PurgeDeadLetters {
        ids: Vec<i64>,
        before_ms: Option<i64>,
    },
    /// Drops dead letters beyond `max_count` (oldest first) and older than
    /// `max_age_ms`; 0 means no limit.
    TrimDeadLetters {
        max_count: u64,
        max_age_ms: i64,
    },
    /// Records which stream (by creation time) the checkpoints of
    /// (application, stream) belong to; `forget_checkpoints` drops those of
    /// an earlier stream of the same name.
    StreamIdentity {
        application: String,
        stream: String,
        created_ms: i64,
        forget_checkpoints: bool,
    },
    DeadLetter {
        integration: String,
        stream: String,
        shard: String,
        sequence_number: String,
        sub_sequence_number: Option<u64>,
        partition_key: String,
        payload: Vec<u8>,
        error: String,
        chain: Option<String>,
        node: Option<String>,
        message: Option<String>,
        arrival_ms: i64,
    },
}

impl Write {
    /// A dead letter for a record (or a message made from it) that failed.
    pub fn dead_letter(
        source: &SourceRecord,
        error: String,
        chain: Option<String>,
        node: Option<String>,
        message: Option<String>,
    ) -> Write {
        Write::DeadLetter {
            integration: source.integration.to_string(),
            stream: source.stream.to_string(),
            shard: source.shard.to_string(),
            sequence_number: source.sequence_number.clone(),
            sub_sequence_number: source.sub_sequence_number,
            partition_key: source.partition_key.clone(),
            payload: source.payload.to_vec(),
            error,
            chain,
            node,
            message,
            arrival_ms: source.arrival_ms,
        }
    }
}

pub(super) struct Job {
    pub writes: Vec<Write>,
    pub reply: Option<oneshot::Sender<Result<(), StoreError>>>,
    pub ticket: Option<Ticket>,
    /// For a rule node with nothing after it: where the message goes when
    /// its writes fail.
    pub dead_letter_on_failure: Option<FailureTarget>,
}

/// The rule node and message a failed write came from, for its dead
/// letter.
pub struct FailureTarget {
    pub chain: String,
    pub node: String,
    pub message: TbMsg,
}

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 2048;

/// The changes a commit announces, once per commit.
pub type Changes = Arc<Vec<Change>>;

pub(super) fn spawn(
    conn: Connection,
    writable: Arc<AtomicBool>,
    changes: broadcast::Sender<Changes>,
) -> mpsc::UnboundedSender<Job> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || run(conn, rx, writable, changes))
        .expect("the store writer thread can be started");
    tx
}

fn run(
    mut conn: Connection,
    mut rx: mpsc::UnboundedReceiver<Job>,
    writable: Arc<AtomicBool>,
    changes: broadcast::Sender<Changes>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }

        let outcomes = commit_with_retry(&mut conn, &batch, &writable);

        // Announced after the commit, so a listener that reads on an
        // announcement sees the data. Nothing is built without listeners.
        if changes.receiver_count() > 0 {
            let committed = collect_changes(&batch, &outcomes);
            if !committed.is_empty() {
                let _ = changes.send(Arc::new(committed));
            }
        }

        // Answers and ticket releases happen only after the commit.
        for (job, outcome) in batch.drain(..).zip(outcomes) {
            if let Some(reply) = job.reply {
                let _ = reply.send(outcome);
            }
            drop(job.ticket);
        }
    }
}

/// What the committed jobs of a batch changed, one entry per entity, kind
/// and scope, keys merged.
fn collect_changes(batch: &[Job], outcomes: &[Result<(), StoreError>]) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::new();
    // Index of each (kind, entity, scope, deleted) in `out`: a batch can
    // touch thousands of entities.
    let mut index: HashMap<(u8, uuid::Uuid, Option<Scope>, bool), usize> = HashMap::new();
    let mut merge = |change: Change| {
        let key = match &change {
            Change::EntityCreated { entity_id, .. } => (0, *entity_id, None, false),
            Change::Telemetry { entity_id, .. } => (1, *entity_id, None, false),
            Change::Attributes {
                entity_id,
                scope,
                deleted,
                ..
            } => (2, *entity_id, Some(*scope), *deleted),
        };
        match index.get(&key) {
            Some(&at) => out[at].merge_keys(change),
            None => {
                index.insert(key, out.len());
                out.push(change);
            }
        }
    };
    for (job, outcome) in batch.iter().zip(outcomes) {
        if outcome.is_err() {
            continue;
        }
        for write in &job.writes {
            match write {
                Write::Entity(e) => merge(Change::EntityCreated {
                    entity_type: e.id.entity_type,
                    entity_id: e.id.id,
                    name: e.name.clone(),
                }),
                Write::Telemetry { entity, values, .. } => merge(Change::Telemetry {
                    entity_id: entity.id,
                    keys: values.iter().map(|(k, _)| k.clone()).collect(),
                }),
                Write::Attributes {
                    entity,
                    scope,
                    values,
                    ..
                } => merge(Change::Attributes {
                    entity_id: entity.id,
                    scope: *scope,
                    keys: values.iter().map(|(k, _)| k.clone()).collect(),
                    deleted: false,
                }),
                Write::DeleteAttributes {
                    entity,
                    scope,
                    keys,
                } => merge(Change::Attributes {
                    entity_id: entity.id,
                    scope: *scope,
                    keys: keys.clone(),
                    deleted: true,
                }),
                _ => {}
            }
        }
    }
    out
}

/// Commits a batch, retrying for as long as the failure is one a retry can
/// cure. Returns each job's outcome.
fn commit_with_retry(
    conn: &mut Connection,
    batch: &[Job],
    writable: &AtomicBool,
) -> Vec<Result<(), StoreError>> {
    let mut pause = Duration::from_millis(100);
    loop {
        let started = std::time::Instant::now();
        let committed = commit(conn, batch);
        crate::status::TOTALS.store_commit.record(started.elapsed());
        match committed {
            Ok(outcomes) => {
                if !writable.swap(true, Ordering::Relaxed) {
                    tracing::info!("store writable again; consumption resumes");
                }
                return outcomes;
            }
            Err(e) => {
                writable.store(false, Ordering::Relaxed);
                tracing::error!(
                    error = %e,
                    jobs = batch.len(),
                    retry_in_ms = pause.as_millis() as u64,
                    "store commit failed; consumption waits until the store is writable"
                );
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn commit(conn: &mut Connection, batch: &[Job]) -> rusqlite::Result<Vec<Result<(), StoreError>>> {
    // The common case: every job applies; one transaction, no savepoints.
    let tx = conn.transaction()?;
    match batch.iter().try_for_each(|job| apply_all(&tx, &job.writes)) {
        Ok(()) => {
            tx.commit()?;
            return Ok(batch.iter().map(|_| Ok(())).collect());
        }
        Err(e) if is_transient(&e) => return Err(e),
        Err(_) => tx.rollback()?,
    }

    // Some job's content failed: apply each job in a savepoint so that it
    // fails alone and the rest commit.
    let tx = conn.transaction()?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for job in batch {
        let sp = tx.unchecked_transaction_savepoint()?;
        match apply_all(&sp, &job.writes) {
            Ok(()) => {
                sp.release()?;
                outcomes.push(Ok(()));
            }
            Err(e) if is_transient(&e) => return Err(e),
            Err(e) => {
                sp.rollback_to()?;
                if let (Some(target), Some(ticket)) = (&job.dead_letter_on_failure, &job.ticket) {
                    keep_as_dead_letter(&tx, target, ticket, &e)?;
                }
                outcomes.push(Err(StoreError::Sqlite(e)));
            }
        }
    }
    tx.commit()?;
    Ok(outcomes)
}

/// Stores the dead letter of a message whose writes failed, in the same
/// transaction, so its record is done only once the dead letter is kept.
fn keep_as_dead_letter(
    tx: &rusqlite::Transaction<'_>,
    target: &FailureTarget,
    ticket: &Ticket,
    error: &rusqlite::Error,
) -> rusqlite::Result<()> {
    let source = ticket.source();
    let error = format!("not saved: {error}");
    tracing::error!(
        chain = %target.chain, node = %target.node, integration = %source.integration,
        stream = %source.stream, shard = %source.shard, sequence_number = %source.sequence_number,
        error = %error, "message failed with no Failure connection; kept as a dead letter"
    );
    let write = Write::dead_letter(
        source,
        error,
        Some(target.chain.clone()),
        Some(target.node.clone()),
        serde_json::to_string(&target.message).ok(),
    );
    apply(tx, &write)
}

/// A savepoint on a transaction we only hold by shared reference.
trait SavepointExt {
    fn unchecked_transaction_savepoint(&self) -> rusqlite::Result<Savepoint<'_>>;
}

impl SavepointExt for rusqlite::Transaction<'_> {
    fn unchecked_transaction_savepoint(&self) -> rusqlite::Result<Savepoint<'_>> {
        self.execute_batch("SAVEPOINT job")?;
        Ok(Savepoint { conn: self })
    }
}

struct Savepoint<'a> {
    conn: &'a Connection,
}

impl Savepoint<'_> {
    fn release(self) -> rusqlite::Result<()> {
        self.conn.execute_batch("RELEASE job")
    }

    fn rollback_to(self) -> rusqlite::Result<()> {
        self.conn.execute_batch("ROLLBACK TO job; RELEASE job")
    }
}

impl std::ops::Deref for Savepoint<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

fn is_transient(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(
            ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
                | ErrorCode::OutOfMemory
        )
    )
}

fn apply_all(conn: &Connection, writes: &[Write]) -> rusqlite::Result<()> {
    for write in writes {
        apply(conn, write)?;
    }
    Ok(())
}

fn apply(conn: &Connection, write: &Write) -> rusqlite::Result<()> {
    match write {
        Write::Entity(e) => {
            conn.prepare_cached(
                "INSERT OR IGNORE INTO entities
                 (id, entity_type, name, type, label, customer_name, group_name, created_time)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                e.id.id.to_string(),
                e.id.entity_type.as_str(),
                e.name,
                e.profile,
                e.label,
                e.customer_name,
                e.group_name,
                e.created_time
            ])?;
        }
        Write::Telemetry {
            entity,
            ts,
            values,
            expires_ms,
            latest: with_latest,
        } => {
            let id = entity.id.to_string();
            let mut history = conn.prepare_cached(
                "INSERT OR REPLACE INTO ts_kv (entity_id, key, ts, kind, long_v, dbl_v, str_v, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            // A latest value only moves forward in time.
            let mut latest = conn.prepare_cached(
                "INSERT INTO ts_kv_latest (entity_id, key, ts, kind, long_v, dbl_v, str_v)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (entity_id, key) DO UPDATE SET
                   ts = excluded.ts, kind = excluded.kind, long_v = excluded.long_v,
                   dbl_v = excluded.dbl_v, str_v = excluded.str_v
                 WHERE excluded.ts >= ts_kv_latest.ts",
            )?;
            for (key, value) in values {
                let (kind, long_v, dbl_v, str_v) = value.columns();
                history.execute(params![id, key, ts, kind, long_v, dbl_v, str_v, expires_ms])?;
                if *with_latest {
                    latest.execute(params![id, key, ts, kind, long_v, dbl_v, str_v])?;
                }
            }
        }
        Write::DeleteAttributes {
            entity,
            scope,
            keys,
        } => {
            let mut stmt = conn.prepare_cached(
                "DELETE FROM attributes WHERE entity_id = ?1 AND scope = ?2 AND key = ?3",
            )?;
            let id = entity.id.to_string();
            for key in keys {
                stmt.execute(params![id, scope.as_str(), key])?;
            }
        }
        Write::PurgeExpiredTelemetry { now_ms, limit } => {
            conn.prepare_cached(
                "DELETE FROM ts_kv WHERE (entity_id, key, ts) IN
                   (SELECT entity_id, key, ts FROM ts_kv WHERE expires_ms < ?1 LIMIT ?2)",
            )?
            .execute(params![now_ms, limit])?;
        }
        Write::DebugEvent(e) => {
            conn.prepare_cached(
                "INSERT INTO debug_events (ts, chain, node, direction, relation, msg_id, msg_type,
                   originator, data, metadata, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                e.ts,
                e.chain,
                e.node,
                e.direction,
                e.relation,
                e.msg_id,
                e.msg_type,
                e.originator,
                e.data,
                e.metadata,
                e.error
            ])?;
        }
        Write::Outbox { id, message } => {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO outbox (id, created_ms, message) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![id, crate::msg::now_millis(), message])?;
        }
        Write::OutboxDone { id } => {
            conn.prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                .execute(params![id])?;
        }
        Write::TrimDebugEvents { max_count } => {
            conn.prepare_cached(
                "DELETE FROM debug_events WHERE id <=
                   (SELECT id FROM debug_events ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            )?
            .execute(params![*max_count as i64])?;
        }
        Write::Attributes {
            entity,
            scope,
            ts,
            values,
        } => {
            let mut stmt = conn.prepare_cached(
                "INSERT INTO attributes (entity_id, scope, key, last_update_ts, kind, long_v, dbl_v, str_v)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (entity_id, scope, key) DO UPDATE SET
                   last_update_ts = excluded.last_update_ts, kind = excluded.kind,
                   long_v = excluded.long_v, dbl_v = excluded.dbl_v, str_v = excluded.str_v",
            )?;
            let id = entity.id.to_string();
            for (key, value) in values {
                let (kind, long_v, dbl_v, str_v) = value.columns();
                stmt.execute(params![
                    id,
                    scope.as_str(),
                    key,
                    ts,
                    kind,
                    long_v,
                    dbl_v,
                    str_v
                ])?;
            }
        }
        Write::Checkpoint {
            application,
            stream,
            shard,
            sequence_number,
            sub_sequence_number,
            arrival_ms,
            shard_end,
        } => {
            conn.prepare_cached(
                "INSERT INTO checkpoints (application, stream, shard, sequence_number, shard_end,
                   updated_ms, sub_sequence_number, arrival_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (application, stream, shard) DO UPDATE SET
                   sequence_number = excluded.sequence_number, shard_end = excluded.shard_end,
                   updated_ms = excluded.updated_ms,
                   sub_sequence_number = excluded.sub_sequence_number,
                   arrival_ms = excluded.arrival_ms",
            )?
            .execute(params![
                application,
                stream,
                shard,
                sequence_number,
                *shard_end as i64,
                crate::msg::now_millis(),
                sub_sequence_number.map(|n| n as i64),
                arrival_ms
            ])?;
        }
        Write::LatestFrom {
            application,
            stream,
            shard,
            from_ms,
        } => {
            conn.prepare_cached(
                "INSERT INTO checkpoints (application, stream, shard, sequence_number, shard_end,
                   updated_ms, latest_from_ms)
                 VALUES (?1, ?2, ?3, NULL, 0, ?4, ?4)
                 ON CONFLICT (application, stream, shard) DO UPDATE SET latest_from_ms = excluded.latest_from_ms",
            )?
            .execute(params![application, stream, shard, from_ms])?;
        }
        Write::DeadLetterReplayed { id } => {
            conn.prepare_cached("UPDATE dead_letters SET replayed_ms = ?2 WHERE id = ?1")?
                .execute(params![id, crate::msg::now_millis()])?;
        }
        Write::PurgeDeadLetters { ids, before_ms } => {
            if !ids.is_empty() {
                let mut stmt = conn.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
                for id in ids {
                    stmt.execute(params![id])?;
                }
            } else {
                conn.prepare_cached(
                    "DELETE FROM dead_letters WHERE ?1 IS NULL OR created_ms < ?1",
                )?
                .execute(params![before_ms])?;
            }
        }
        Write::TrimDeadLetters {
            max_count,
            max_age_ms,
        } => {
            if *max_age_ms > 0 {
                conn.prepare_cached("DELETE FROM dead_letters WHERE created_ms < ?1")?
                    .execute(params![crate::msg::now_millis() - max_age_ms])?;
            }
            if *max_count > 0 {
                conn.prepare_cached(
                    "DELETE FROM dead_letters WHERE id <=
                       (SELECT id FROM dead_letters ORDER BY id DESC LIMIT 1 OFFSET ?1)",
                )?
                .execute(params![*max_count as i64])?;
            }
        }
        Write::StreamIdentity {
            application,
            stream,
            created_ms,
            forget_checkpoints,
        } => {
            if *forget_checkpoints {
                conn.prepare_cached(
                    "DELETE FROM checkpoints WHERE application = ?1 AND stream = ?2",
                )?
                .execute(params![application, stream])?;
            }
            conn.prepare_cached(
                "INSERT INTO streams (application, stream, created_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (application, stream) DO UPDATE SET created_ms = excluded.created_ms",
            )?
            .execute(params![application, stream, created_ms])?;
        }
        Write::DeadLetter {
            integration,
            stream,
            shard,
            sequence_number,
            sub_sequence_number,
            partition_key,
            payload,
            error,
            chain,
            node,
            message,
            arrival_ms,
        } => {
            conn.prepare_cached(
                "INSERT INTO dead_letters (created_ms, integration, stream, shard, sequence_number,
                   partition_key, payload, error, chain, node, message, arrival_ms,
                   sub_sequence_number)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                crate::msg::now_millis(),
                integration,
                stream,
                shard,
                sequence_number,
                partition_key,
                payload,
                error,
                chain,
                node,
                message,
                arrival_ms,
                sub_sequence_number.map(|n| n as i64)
            ])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::EntityType;

    fn job(writes: Vec<Write>) -> Job {
        Job {
            writes,
            reply: None,
            ticket: None,
            dead_letter_on_failure: None,
        }
    }

    #[test]
    fn changes_of_a_batch_are_merged_per_entity_and_failed_jobs_left_out() {
        let device = EntityId {
            entity_type: EntityType::Device,
            id: uuid::Uuid::new_v4(),
        };
        let telemetry = |key: &str| Write::Telemetry {
            entity: device,
            ts: 1,
            values: vec![(key.to_string(), KvValue::Long(1))],
            expires_ms: None,
            latest: true,
        };
        let batch = vec![
            job(vec![telemetry("a"), telemetry("b")]),
            job(vec![telemetry("a")]),
            job(vec![telemetry("failed")]),
            job(vec![Write::DeleteAttributes {
                entity: device,
                scope: Scope::Shared,
                keys: vec!["v".into()],
            }]),
        ];
        let outcomes = vec![Ok(()), Ok(()), Err(StoreError::WriterGone), Ok(())];
        let changes = collect_changes(&batch, &outcomes);
        assert_eq!(
            changes,
            vec![
                Change::Telemetry {
                    entity_id: device.id,
                    keys: vec!["a".into(), "b".into()],
                },
                Change::Attributes {
                    entity_id: device.id,
                    scope: Scope::Shared,
                    keys: vec!["v".into()],
                    deleted: true,
                },
            ]
        );
    }
}
