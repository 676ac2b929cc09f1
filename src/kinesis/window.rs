//! A shard's in-flight window: the records fetched but not yet done, in
//! sequence order, and the checkpoint they allow.
//!
//! Records complete in any order; the checkpoint is the last record such
//! that it and every record before it are done. The window's size in
//! records and bytes is what bounds a shard's memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A Kinesis sequence number: a decimal integer compared as a number,
/// never as text. Real sequence numbers have 56 digits and more, beyond
/// `u128`, so the comparison is by digit count, then digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceNumber(String);

impl SequenceNumber {
    pub fn parse(text: &str) -> Option<SequenceNumber> {
        if text.is_empty() || text.len() > 200 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = text.trim_start_matches('0');
        Some(SequenceNumber(
            if digits.is_empty() { "0" } else { digits }.to_string(),
        ))
    }
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

struct Slot {
    sequence_number: String,
    sub: Option<SubRecord>,
    bytes: usize,
    /// Budget records the slot holds: 1 for the last (or only) slot of a
    /// Kinesis record, 0 for the other user records of an aggregate.
    budget_records: usize,
    done: bool,
    fetched_at: Instant,
    arrival_ms: i64,
}

/// Where a user record sits in its KPL aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRecord {
    /// Its sub-sequence number (index in the aggregate).
    pub number: u64,
    /// Whether it is the last user record of the aggregate that is read.
    pub last: bool,
}

/// How far a shard is done: a record, or a user record inside an
/// aggregate, and when that record arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub sequence_number: String,
    /// Set while only part of an aggregate is done: the sub-sequence
    /// number of its last done user record. `None` once the whole record
    /// is done.
    pub sub_sequence_number: Option<u64>,
    /// The record's ApproximateArrivalTimestamp, epoch milliseconds.
    pub arrival_ms: i64,
}

impl std::fmt::Display for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.sub_sequence_number {
            Some(sub) => write!(f, "{}/{sub}", self.sequence_number),
            None => f.write_str(&self.sequence_number),
        }
    }
}

/// The process-wide share of the in-flight bound: all shards together hold
/// at most this many records and bytes, however many shards there are.
#[derive(Debug)]
pub struct Budget {
    records: AtomicUsize,
    bytes: AtomicUsize,
    max_records: usize,
    max_bytes: usize,
}

impl Budget {
    pub fn new(max_records: usize, max_bytes: usize) -> Budget {
        Budget {
            records: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_records,
            max_bytes,
        }
    }

    /// Reserves up to `wanted` records for a fetch, so that shards fetching
    /// at the same moment cannot together overshoot the bound; returns how
    /// many were reserved (0 when full).
    pub fn reserve(&self, wanted: usize) -> usize {
        if self.bytes.load(Ordering::Relaxed) >= self.max_bytes {
            return 0;
        }
        let mut granted = 0;
        let _ = self
            .records
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                granted = wanted.min(self.max_records.saturating_sub(used));
                (granted > 0).then_some(used + granted)
            });
        granted
    }

    /// Gives back reserved records a fetch did not use.
    pub fn unreserve(&self, records: usize) {
        self.records.fetch_sub(records, Ordering::AcqRel);
    }

    /// Counts a fetched record's bytes (its record was reserved).
    pub fn take_bytes(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A record is done: its reservation and bytes are free again. The
    /// user records of an aggregate hold one reservation together, given
    /// back with the last of them (`records` is 0 for the others).
    pub fn give_back(&self, records: usize, bytes: usize) {
        self.records.fetch_sub(records, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Whether any record could be reserved now.
    pub fn has_room(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) < self.max_bytes
            && self.records.load(Ordering::Relaxed) < self.max_records
    }
}

/// How long a completed record took.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The record's payload size.
    pub bytes: usize,
    /// Budget records it held (see [`Budget::give_back`]).
    pub budget_records: usize,
    /// From hand-over to the pipeline until done.
    pub since_fetch: Duration,
    /// The record's ApproximateArrivalTimestamp, epoch milliseconds.
    pub arrival_ms: i64,
}

/// See the module docs.
pub struct Window {
    /// Index of the first slot in `slots`.
    base: u64,
    slots: VecDeque<Slot>,
    bytes: usize,
    /// The newest record (or user record) every one up to which is done.
    checkpoint: Option<Done>,
    last_key: Option<(SequenceNumber, Option<u64>)>,
}

/// Why a record could not enter the window.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("sequence number {0:?} is not a decimal number")]
    BadSequenceNumber(String),
    #[error("sequence number {new} is not after {previous}: records out of order")]
    OutOfOrder { previous: String, new: String },
    #[error("user record {sequence_number}/{sub} is not after {previous_sub}: user records out of order")]
    SubOutOfOrder {
        sequence_number: String,
        previous_sub: String,
        sub: u64,
    },
}

impl Default for Window {
    fn default() -> Self {
        Window::new()
    }
}

impl Window {
    pub fn new() -> Window {
        Window {
            base: 0,
            slots: VecDeque::new(),
            bytes: 0,
            checkpoint: None,
            last_key: None,
        }
    }

    /// Adds a fetched record, or one user record of an aggregate (`sub`);
    /// returns its index for [`Window::complete`]. Records must come in
    /// sequence order, and user records of one aggregate in sub-sequence
    /// order.
    pub fn push(
        &mut self,
        sequence_number: &str,
        sub: Option<SubRecord>,
        bytes: usize,
        budget_records: usize,
        arrival_ms: i64,
    ) -> Result<u64, WindowError> {
        let parsed = SequenceNumber::parse(sequence_number)
            .ok_or_else(|| WindowError::BadSequenceNumber(sequence_number.to_string()))?;
        if let Some((previous, previous_sub)) = &self.last_key {
            if parsed < *previous {
                return Err(WindowError::OutOfOrder {
                    previous: previous.to_string(),
                    new: parsed.to_string(),
                });
            }
            if parsed == *previous {
                let new_sub = sub.map(|s| s.number);
                let after = matches!((previous_sub, new_sub), (Some(p), Some(n)) if n > *p);
                if !after {
                    return match new_sub {
                        Some(sub) => Err(WindowError::SubOutOfOrder {
                            sequence_number: parsed.to_string(),
                            previous_sub: previous_sub
                                .map(|p| p.to_string())
                                .unwrap_or_else(|| "the whole record".into()),
                            sub,
                        }),
                        None => Err(WindowError::OutOfOrder {
                            previous: previous.to_string(),
                            new: parsed.to_string(),
                        }),
                    };
                }
            }
        }
        self.last_key = Some((parsed, sub.map(|s| s.number)));
        self.slots.push_back(Slot {
            sequence_number: sequence_number.to_string(),
            sub,
            bytes,
            budget_records,
            done: false,
            fetched_at: Instant::now(),
            arrival_ms,
        });
        self.bytes += bytes;
        Ok(self.base + self.slots.len() as u64 - 1)
    }

    /// Marks a record done and advances the checkpoint over every done
    /// record at the front. Returns how long the record took.
    pub fn complete(&mut self, index: u64) -> Option<Timing> {
        let offset = index.checked_sub(self.base)?;
        let slot = self.slots.get_mut(offset as usize)?;
        if slot.done {
            return None;
        }
        slot.done = true;
        let timing = Timing {
            bytes: slot.bytes,
            budget_records: slot.budget_records,
            since_fetch: slot.fetched_at.elapsed(),
            arrival_ms: slot.arrival_ms,
        };
        while self.slots.front().is_some_and(|s| s.done) {
            let slot = self.slots.pop_front().expect("front exists");
            self.bytes -= slot.bytes;
            self.base += 1;
            self.checkpoint = Some(Done {
                sub_sequence_number: slot.sub.filter(|s| !s.last).map(|s| s.number),
                sequence_number: slot.sequence_number,
                arrival_ms: slot.arrival_ms,
            });
        }
        Some(timing)
    }

    /// The sequence number of a record still in the window.
    pub fn sequence_number(&self, index: u64) -> Option<&str> {
        let offset = index.checked_sub(self.base)?;
        self.slots
            .get(offset as usize)
            .map(|s| s.sequence_number.as_str())
    }

    /// The index of the oldest record not done; every record before it is
    /// done.
    pub fn first_pending(&self) -> Option<u64> {
        (!self.slots.is_empty()).then_some(self.base)
    }

    pub fn checkpoint(&self) -> Option<&Done> {
        self.checkpoint.as_ref()
    }

    pub fn records(&self) -> usize {
        self.slots.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_waits_for_every_earlier_record() {
        let mut w = Window::new();
        let a = w.push("100", None, 10, 1, 0).unwrap();
        let b = w.push("200", None, 10, 1, 0).unwrap();
        let c = w.push("300", None, 10, 1, 0).unwrap();
        w.complete(c);
        assert_eq!(w.checkpoint(), None);
        w.complete(a);
        assert_eq!(w.checkpoint().unwrap().to_string(), "100");
        w.complete(b);
        assert_eq!(w.checkpoint().unwrap().to_string(), "300");
        assert!(w.is_empty());
        assert_eq!(w.bytes(), 0);
    }

    #[test]
    fn reservations_never_overshoot_the_budget() {
        let budget = Budget::new(10, 1000);
        assert_eq!(budget.reserve(6), 6);
        assert_eq!(budget.reserve(6), 4);
        assert_eq!(budget.reserve(1), 0);
        budget.unreserve(3);
        assert_eq!(budget.reserve(5), 3);
        budget.give_back(1, 0);
        assert!(budget.has_room());
    }

    #[test]
    fn sequence_numbers_compare_as_numbers_not_text() {
        let mut w = Window::new();
        w.push("9", None, 1, 1, 0).unwrap();
        // As text "10" < "9"; as numbers it is later.
        assert!(w.push("10", None, 1, 1, 0).is_ok());
        assert!(matches!(
            w.push("10", None, 1, 1, 0),
            Err(WindowError::OutOfOrder { .. })
        ));
        let long = "49599874927422395224927130964668873176443726009932447746";
        let longer = "49599874927422395224927130964668873176443726009932447747";
        assert!(SequenceNumber::parse(long) < SequenceNumber::parse(longer));
        assert!(SequenceNumber::parse("0099") < SequenceNumber::parse("100"));
    }

    #[test]
    fn a_checkpoint_inside_an_aggregate_carries_the_sub_sequence_number() {
        let mut w = Window::new();
        let sub = |number, last| Some(SubRecord { number, last });
        let a = w.push("100", sub(0, false), 5, 0, 7).unwrap();
        let b = w.push("100", sub(1, false), 5, 0, 7).unwrap();
        let c = w.push("100", sub(2, true), 5, 1, 7).unwrap();
        assert!(matches!(
            w.push("100", sub(2, true), 5, 1, 7),
            Err(WindowError::SubOutOfOrder { .. })
        ));
        assert!(matches!(
            w.push("100", None, 5, 1, 7),
            Err(WindowError::OutOfOrder { .. })
        ));
        w.complete(a);
        w.complete(b);
        let done = w.checkpoint().unwrap();
        assert_eq!(done.sub_sequence_number, Some(1));
        assert_eq!(done.to_string(), "100/1");
        // The last user record done: the whole record is.
        let timing = w.complete(c).unwrap();
        assert_eq!(timing.budget_records, 1);
        assert_eq!(w.checkpoint().unwrap().sub_sequence_number, None);
        assert_eq!(w.checkpoint().unwrap().arrival_ms, 7);
        assert!(w.push("101", None, 1, 1, 8).is_ok());
    }
}
