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
    bytes: usize,
    done: bool,
    fetched_at: Instant,
    arrival_ms: i64,
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

    /// A record is done: its reservation and bytes are free again.
    pub fn give_back(&self, bytes: usize) {
        self.records.fetch_sub(1, Ordering::AcqRel);
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
    /// The newest sequence number every record up to which is done.
    checkpoint: Option<String>,
    last_sequence: Option<SequenceNumber>,
}

/// Why a record could not enter the window.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("sequence number {0:?} is not a decimal number")]
    BadSequenceNumber(String),
    #[error("sequence number {new} is not after {previous}: records out of order")]
    OutOfOrder { previous: String, new: String },
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
            last_sequence: None,
        }
    }

    /// Adds a fetched record; returns its index for [`Window::complete`].
    pub fn push(
        &mut self,
        sequence_number: &str,
        bytes: usize,
        arrival_ms: i64,
    ) -> Result<u64, WindowError> {
        let parsed = SequenceNumber::parse(sequence_number)
            .ok_or_else(|| WindowError::BadSequenceNumber(sequence_number.to_string()))?;
        if let Some(previous) = &self.last_sequence {
            if parsed <= *previous {
                return Err(WindowError::OutOfOrder {
                    previous: previous.to_string(),
                    new: parsed.to_string(),
                });
            }
        }
        self.last_sequence = Some(parsed);
        self.slots.push_back(Slot {
            sequence_number: sequence_number.to_string(),
            bytes,
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
            since_fetch: slot.fetched_at.elapsed(),
            arrival_ms: slot.arrival_ms,
        };
        while self.slots.front().is_some_and(|s| s.done) {
            let slot = self.slots.pop_front().expect("front exists");
            self.bytes -= slot.bytes;
            self.base += 1;
            self.checkpoint = Some(slot.sequence_number);
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

    pub fn checkpoint(&self) -> Option<&str> {
        self.checkpoint.as_deref()
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
        let a = w.push("100", 10, 0).unwrap();
        let b = w.push("200", 10, 0).unwrap();
        let c = w.push("300", 10, 0).unwrap();
        w.complete(c);
        assert_eq!(w.checkpoint(), None);
        w.complete(a);
        assert_eq!(w.checkpoint(), Some("100"));
        w.complete(b);
        assert_eq!(w.checkpoint(), Some("300"));
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
        budget.give_back(0);
        assert!(budget.has_room());
    }

    #[test]
    fn sequence_numbers_compare_as_numbers_not_text() {
        let mut w = Window::new();
        w.push("9", 1, 0).unwrap();
        // As text "10" < "9"; as numbers it is later.
        assert!(w.push("10", 1, 0).is_ok());
        assert!(matches!(
            w.push("10", 1, 0),
            Err(WindowError::OutOfOrder { .. })
        ));
        let long = "49599874927422395224927130964668873176443726009932447746";
        let longer = "49599874927422395224927130964668873176443726009932447747";
        assert!(SequenceNumber::parse(long) < SequenceNumber::parse(longer));
        assert!(SequenceNumber::parse("0099") < SequenceNumber::parse("100"));
    }
}
