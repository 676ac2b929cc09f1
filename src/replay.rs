//! Replaying dead letters: a record that could not be processed is run
//! again, from its bytes, through the current uplink converter and the
//! rule chain.
//!
//! A dead letter is marked replayed once everything the replay produced is
//! done (stored, sent, or kept as a new dead letter); a replayed record is
//! never replayed again, so asking twice is harmless. Dead letters from the
//! API (failed attribute-update messages) have no record to convert and are
//! skipped.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use actix::Addr;
use serde::Serialize;

use crate::chain::{RuleSet, Rules};
use crate::convert::{ConverterWorker, Decode, DecodeInput, Script};
use crate::delivery::{CompletionSink, SourceRecord, Ticket};
use crate::ingest;
use crate::store::{DeadLetterFilter, Store, Write};

/// What a replay did, by dead-letter id.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    /// Converted again and handed to the chain.
    pub replayed: Vec<i64>,
    /// Failed again; they stay as they are.
    pub failed: Vec<ReplayProblem>,
    /// Not replayable (no such integration, or a replay under way).
    pub skipped: Vec<ReplayProblem>,
}

#[derive(Debug, Serialize)]
pub struct ReplayProblem {
    pub id: i64,
    pub reason: String,
}

pub struct Replayer {
    store: Store,
    js: Addr<ConverterWorker>,
    /// The current converters and chains, which replays go through.
    rules: Arc<Rules>,
    under_way: Arc<Mutex<HashSet<i64>>>,
}

impl Replayer {
    pub fn new(store: Store, js: Addr<ConverterWorker>, rules: Arc<Rules>) -> Replayer {
        Replayer {
            store,
            js,
            rules,
            under_way: Arc::default(),
        }
    }

    /// Replays the dead letters `filter` selects that were not replayed yet.
    pub async fn replay(&self, mut filter: DeadLetterFilter) -> anyhow::Result<ReplayReport> {
        filter.unreplayed_only = true;
        let store = self.store.clone();
        let letters = tokio::task::spawn_blocking(move || store.dead_letters(&filter)).await??;
        let mut report = ReplayReport::default();
        let set = self.rules.current();
        for letter in letters {
            let Some(decoder) = set.decoders.get(&letter.integration) else {
                report.skipped.push(ReplayProblem {
                    id: letter.id,
                    reason: format!(
                        "integration {:?} is not configured (dead letters of the API cannot be replayed)",
                        letter.integration
                    ),
                });
                continue;
            };
            if !self
                .under_way
                .lock()
                .expect("replay lock")
                .insert(letter.id)
            {
                report.skipped.push(ReplayProblem {
                    id: letter.id,
                    reason: "a replay of it is under way".into(),
                });
                continue;
            }
            let source = Arc::new(SourceRecord {
                integration: letter.integration.as_str().into(),
                stream: letter.stream.as_str().into(),
                shard: letter.shard.as_str().into(),
                sequence_number: letter.sequence_number.clone(),
                sub_sequence_number: letter.sub_sequence_number,
                partition_key: letter.partition_key.clone(),
                explicit_hash_key: None,
                arrival_ms: letter.arrival_ms,
                payload: letter.payload.into(),
            });
            match self
                .convert_and_submit(&set, decoder.clone(), source, letter.id)
                .await
            {
                Ok(()) => report.replayed.push(letter.id),
                Err(reason) => {
                    self.under_way
                        .lock()
                        .expect("replay lock")
                        .remove(&letter.id);
                    report.failed.push(ReplayProblem {
                        id: letter.id,
                        reason,
                    });
                }
            }
        }
        Ok(report)
    }

    async fn convert_and_submit(
        &self,
        set: &Arc<RuleSet>,
        decoder: Arc<Script>,
        source: Arc<SourceRecord>,
        id: i64,
    ) -> Result<(), String> {
        let job = Decode {
            script: decoder,
            records: vec![DecodeInput {
                record: source.clone(),
            }],
        };
        let mut results = self.js.send(job).await.map_err(|e| e.to_string())?;
        let uplinks = results
            .pop()
            .ok_or("the converter returned nothing")?
            .map_err(|e| e.to_string())?;
        let sink = Arc::new(ReplayDone {
            store: self.store.clone(),
            id,
            under_way: self.under_way.clone(),
        });
        let ticket = Ticket::new(0, sink, source.clone());
        let messages = ingest::uplink_messages(&uplinks, &source, &self.store, &ticket)
            .map_err(|e| e.to_string())?;
        for message in messages {
            set.submit(message, ticket.clone());
        }
        Ok(())
    }
}

/// Marks a dead letter replayed once its replay is done.
struct ReplayDone {
    store: Store,
    id: i64,
    under_way: Arc<Mutex<HashSet<i64>>>,
}

impl CompletionSink for ReplayDone {
    fn complete(&self, _: u64, ok: bool) {
        if ok {
            let _ = self
                .store
                .submit(vec![Write::DeadLetterReplayed { id: self.id }], None);
        }
        if let Ok(mut under_way) = self.under_way.lock() {
            under_way.remove(&self.id);
        }
    }
}
