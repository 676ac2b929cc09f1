//! Delivery tracking: how shardflow knows a record is done.
//!
//! Every record read from a shard gets a [`Ticket`]. Each message produced
//! from the record carries a clone of it, through every copy and every rule
//! node, and the sinks hold it until their work is durable (a store commit,
//! a PutRecords answer, a dead-letter row). When the last clone is dropped
//! the record is done and its source is told, which is what lets the shard
//! checkpoint move. A ticket dropped while its thread panics reports a
//! failure instead, so a crash can never count as success.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

/// Where a record came from, kept with its ticket so that a failed record
/// can be stored as a dead letter with its bytes unchanged.
#[derive(Debug, Clone, Default)]
pub struct SourceRecord {
    /// Shared by every record of a shard (one allocation per shard, not
    /// per record).
    pub integration: Arc<str>,
    pub stream: Arc<str>,
    pub shard: Arc<str>,
    pub sequence_number: String,
    /// For a user record of a KPL aggregate: its sub-sequence number.
    pub sub_sequence_number: Option<u64>,
    pub partition_key: String,
    /// For a user record of a KPL aggregate: its explicit hash key.
    pub explicit_hash_key: Option<String>,
    pub arrival_ms: i64,
    /// The record's bytes (a user record's own bytes, for an aggregate).
    pub payload: Bytes,
}

/// Receives the completion of a ticket.
pub trait CompletionSink: Send + Sync + 'static {
    /// `index` is the value given at [`Ticket::new`]; `ok` is false when the
    /// ticket was dropped by a panicking thread.
    fn complete(&self, index: u64, ok: bool);
}

/// A record's claim on completion; see the module docs.
#[derive(Clone)]
pub struct Ticket(Arc<TicketInner>);

struct TicketInner {
    index: u64,
    sink: Option<Arc<dyn CompletionSink>>,
    source: Arc<SourceRecord>,
}

impl Ticket {
    pub fn new(index: u64, sink: Arc<dyn CompletionSink>, source: Arc<SourceRecord>) -> Ticket {
        Ticket(Arc::new(TicketInner {
            index,
            sink: Some(sink),
            source,
        }))
    }

    /// A ticket nobody waits for (e.g. a message started by the API after
    /// its data was already committed).
    pub fn detached(source: SourceRecord) -> Ticket {
        Ticket(Arc::new(TicketInner {
            index: 0,
            sink: None,
            source: Arc::new(source),
        }))
    }

    pub fn source(&self) -> &SourceRecord {
        &self.0.source
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("index", &self.0.index)
            .field("shard", &self.0.source.shard)
            .field("sequence_number", &self.0.source.sequence_number)
            .finish()
    }
}

impl Drop for TicketInner {
    fn drop(&mut self) {
        if let Some(sink) = &self.sink {
            sink.complete(self.index, !std::thread::panicking());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, bool)>>);

    impl CompletionSink for Recorder {
        fn complete(&self, index: u64, ok: bool) {
            self.0.lock().unwrap().push((index, ok));
        }
    }

    #[test]
    fn completes_once_when_the_last_clone_drops() {
        let recorder = Arc::new(Recorder::default());
        let ticket = Ticket::new(7, recorder.clone(), Arc::new(SourceRecord::default()));
        let copy = ticket.clone();
        drop(ticket);
        assert!(recorder.0.lock().unwrap().is_empty());
        drop(copy);
        assert_eq!(*recorder.0.lock().unwrap(), vec![(7, true)]);
    }

    #[test]
    fn a_panicking_holder_reports_failure() {
        let recorder = Arc::new(Recorder::default());
        let ticket = Ticket::new(1, recorder.clone(), Arc::new(SourceRecord::default()));
        let result = std::thread::spawn(move || {
            let _held = ticket;
            panic!("node crashed");
        })
        .join();
        assert!(result.is_err());
        assert_eq!(*recorder.0.lock().unwrap(), vec![(1, false)]);
    }
}
