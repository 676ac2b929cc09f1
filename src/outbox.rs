//! The outbox: messages that enter the rule engine from the API (an
//! attribute save's ATTRIBUTES_UPDATED) are as safe as records from
//! Kinesis. The message is committed in the same transaction as the data
//! it announces, handed to the root chain, and its outbox row is deleted
//! only once everything it led to is done. Rows left by a crash are
//! handed to the root chain again at the next start, so a downlink is not
//! lost when the process dies between the save and the send (it may be
//! sent twice instead: at-least-once).

use std::sync::Arc;

use crate::chain::Rules;
use crate::delivery::{CompletionSink, SourceRecord, Ticket};
use crate::msg::TbMsg;
use crate::store::{Store, StoreError, Write};

/// The writes that store `msg` in the outbox, to commit together with the
/// data it is about.
pub fn entry(msg: &TbMsg) -> Write {
    Write::Outbox {
        id: msg.id.to_string(),
        message: serde_json::to_string(msg).unwrap_or_default(),
    }
}

/// Hands a committed outbox message to the root chain of the running set;
/// its row goes once the message is done.
pub fn submit(rules: &Rules, store: &Store, msg: TbMsg) {
    let id = msg.id.to_string();
    let source = SourceRecord {
        integration: "api".into(),
        partition_key: msg.originator.to_string(),
        arrival_ms: msg.ts,
        ..Default::default()
    };
    let sink = Arc::new(Delivered {
        store: store.clone(),
        id,
    });
    rules
        .current()
        .submit(msg, Ticket::new(0, sink, Arc::new(source)));
}

/// Hands every message left in the outbox (by a crash) to the root chain
/// again; returns how many.
pub fn redrive(rules: &Rules, store: &Store) -> Result<usize, StoreError> {
    let pending = store.outbox()?;
    let count = pending.len();
    for (id, text) in pending {
        match serde_json::from_str::<TbMsg>(&text) {
            Ok(msg) => submit(rules, store, msg),
            Err(e) => {
                tracing::error!(outbox_id = %id, error = %e, "an outbox message cannot be read; it stays in the outbox table");
            }
        }
    }
    if count > 0 {
        tracing::info!(
            messages = count,
            "messages from the API handed to the rule chain again after a restart"
        );
    }
    Ok(count)
}

/// Deletes the outbox row once its message is done.
struct Delivered {
    store: Store,
    id: String,
}

impl CompletionSink for Delivered {
    fn complete(&self, _: u64, ok: bool) {
        if !ok {
            // Kept: the next start hands it to the chain again.
            return;
        }
        let done = Write::OutboxDone {
            id: std::mem::take(&mut self.id.clone()),
        };
        if let Err(e) = self.store.submit(vec![done], None) {
            tracing::warn!(outbox_id = %self.id, error = %e, "outbox row not deleted; the message may be handled again after a restart");
        }
    }
}
