//! KPL aggregated records: how the Kinesis Producer Library packs many user
//! records into one Kinesis record, and how they are taken apart again.
//!
//! An aggregated record is the magic bytes `F3 89 9A C2`, a protobuf
//! `AggregatedRecord` message, and the MD5 digest (16 bytes) of that
//! message:
//!
//! ```text
//! message AggregatedRecord {
//!   repeated string partition_key_table     = 1;
//!   repeated string explicit_hash_key_table = 2;
//!   repeated Record records                 = 3;
//! }
//! message Record {
//!   required uint64 partition_key_index     = 1;
//!   optional uint64 explicit_hash_key_index = 2;
//!   required bytes  data                    = 3;
//!   repeated Tag    tags                    = 4;  // ignored
//! }
//! ```
//!
//! The decoder below reads just that much of the protobuf wire format; it
//! never panics on bad input. A record that starts with the magic bytes but
//! whose digest or message is wrong is not an aggregate: the caller passes
//! it on as a plain record, as the KCL does. User records share their Kinesis
//! record's sequence number and are told apart by their sub-sequence number
//! (their index in `records`).

use std::ops::Range;

use bytes::Bytes;
use md5::{Digest, Md5};

/// The first four bytes of every KPL aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const DIGEST_LEN: usize = 16;

/// One user record taken out of an aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    /// A slice of the aggregate's bytes (no copy).
    pub data: Bytes,
}

/// Why bytes that start with the magic are not a valid aggregate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KplError {
    #[error("too short for an aggregated record ({0} bytes)")]
    TooShort(usize),
    #[error("the MD5 digest does not match the message")]
    BadDigest,
    #[error("bad protobuf: {0}")]
    BadMessage(&'static str),
    #[error("the aggregate holds no user records")]
    Empty,
    #[error("user record {record}: {what} index {index} is outside its table of {len}")]
    BadIndex {
        record: usize,
        what: &'static str,
        index: u64,
        len: usize,
    },
}

/// Whether `data` starts with the aggregate magic bytes.
pub fn has_magic(data: &[u8]) -> bool {
    data.starts_with(&MAGIC)
}

/// The user records of an aggregated record; `None` when `data` does not
/// start with the magic bytes (a plain record).
pub fn deaggregate(data: &Bytes) -> Option<Result<Vec<UserRecord>, KplError>> {
    if !has_magic(data) {
        return None;
    }
    Some(parse(data))
}

fn parse(data: &Bytes) -> Result<Vec<UserRecord>, KplError> {
    if data.len() < MAGIC.len() + DIGEST_LEN {
        return Err(KplError::TooShort(data.len()));
    }
    let body = MAGIC.len()..data.len() - DIGEST_LEN;
    let digest = Md5::digest(&data[body.clone()]);
    if digest.as_slice() != &data[body.end..] {
        return Err(KplError::BadDigest);
    }

    let mut partition_keys = Vec::new();
    let mut hash_keys = Vec::new();
    let mut records = Vec::new();
    let mut message = Fields::new(data, body);
    while let Some((field, value)) = message.next_field()? {
        match (field, value) {
            (1, Value::Bytes(range)) => partition_keys.push(text(data, range)?),
            (2, Value::Bytes(range)) => hash_keys.push(text(data, range)?),
            (3, Value::Bytes(range)) => records.push(record(data, range)?),
            (1..=3, _) => return Err(KplError::BadMessage("a field has the wrong wire type")),
            _ => {}
        }
    }

    if records.is_empty() {
        // Nothing to hand on: kept as a plain record rather than dropped.
        return Err(KplError::Empty);
    }
    records
        .into_iter()
        .enumerate()
        .map(|(n, r)| {
            let partition_key = lookup(&partition_keys, r.partition_key_index, n, "partition key")?;
            let explicit_hash_key = r
                .explicit_hash_key_index
                .map(|i| lookup(&hash_keys, i, n, "explicit hash key"))
                .transpose()?;
            Ok(UserRecord {
                partition_key,
                explicit_hash_key,
                data: data.slice(r.data),
            })
        })
        .collect()
}

fn lookup(
    table: &[String],
    index: u64,
    record: usize,
    what: &'static str,
) -> Result<String, KplError> {
    usize::try_from(index)
        .ok()
        .and_then(|i| table.get(i))
        .cloned()
        .ok_or(KplError::BadIndex {
            record,
            what,
            index,
            len: table.len(),
        })
}

fn text(data: &[u8], range: Range<usize>) -> Result<String, KplError> {
    String::from_utf8(data[range].to_vec()).map_err(|_| KplError::BadMessage("a key is not UTF-8"))
}

struct RecordFields {
    partition_key_index: u64,
    explicit_hash_key_index: Option<u64>,
    data: Range<usize>,
}

fn record(data: &[u8], range: Range<usize>) -> Result<RecordFields, KplError> {
    let mut partition_key_index = None;
    let mut explicit_hash_key_index = None;
    let mut payload = None;
    let mut fields = Fields::new(data, range);
    while let Some((field, value)) = fields.next_field()? {
        match (field, value) {
            (1, Value::Varint(v)) => partition_key_index = Some(v),
            (2, Value::Varint(v)) => explicit_hash_key_index = Some(v),
            (3, Value::Bytes(range)) => payload = Some(range),
            (1..=3, _) => return Err(KplError::BadMessage("a field has the wrong wire type")),
            _ => {}
        }
    }
    Ok(RecordFields {
        partition_key_index: partition_key_index
            .ok_or(KplError::BadMessage("a record has no partition_key_index"))?,
        explicit_hash_key_index,
        data: payload.ok_or(KplError::BadMessage("a record has no data"))?,
    })
}

/// A field's value; length-delimited values as a range of the buffer.
enum Value {
    Varint(u64),
    Bytes(Range<usize>),
    Fixed,
}

/// Reads the fields of one protobuf message in `range` of `data`.
struct Fields<'a> {
    data: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Fields<'a> {
    fn new(data: &'a [u8], range: Range<usize>) -> Self {
        Fields {
            data,
            pos: range.start,
            end: range.end,
        }
    }

    fn varint(&mut self) -> Result<u64, KplError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            if self.pos >= self.end {
                return Err(KplError::BadMessage("a varint runs past the end"));
            }
            let byte = self.data[self.pos];
            self.pos += 1;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(KplError::BadMessage("a varint is longer than 10 bytes"))
    }

    fn skip(&mut self, len: u64) -> Result<Range<usize>, KplError> {
        let len =
            usize::try_from(len).map_err(|_| KplError::BadMessage("a length is too large"))?;
        let start = self.pos;
        let end = start
            .checked_add(len)
            .filter(|end| *end <= self.end)
            .ok_or(KplError::BadMessage("a field runs past the end"))?;
        self.pos = end;
        Ok(start..end)
    }

    fn next_field(&mut self) -> Result<Option<(u64, Value)>, KplError> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.skip(8)?;
                Value::Fixed
            }
            2 => {
                let len = self.varint()?;
                Value::Bytes(self.skip(len)?)
            }
            5 => {
                self.skip(4)?;
                Value::Fixed
            }
            _ => return Err(KplError::BadMessage("unsupported wire type")),
        };
        Ok(Some((key >> 3, value)))
    }
}

/// Where a user record falls in the hash key space: its explicit hash key
/// when it has one (decimal, 0..2^128-1), else the MD5 of its partition key
/// read as a big-endian 128-bit number, as Kinesis routes records. `None`
/// for an explicit hash key that is not such a number.
pub fn hash_key(partition_key: &str, explicit_hash_key: Option<&str>) -> Option<u128> {
    match explicit_hash_key {
        Some(text) => parse_hash_key(text),
        None => Some(u128::from_be_bytes(
            Md5::digest(partition_key.as_bytes()).into(),
        )),
    }
}

/// A decimal hash key in 0..=2^128-1.
pub fn parse_hash_key(text: &str) -> Option<u128> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal KPL encoder, for the tests only.
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
        varint(out, field << 3 | 2);
        varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    fn aggregate(
        keys: &[&str],
        hash_keys: &[&str],
        records: &[(u64, Option<u64>, &[u8])],
    ) -> Bytes {
        let mut body = Vec::new();
        for key in keys {
            bytes_field(&mut body, 1, key.as_bytes());
        }
        for key in hash_keys {
            bytes_field(&mut body, 2, key.as_bytes());
        }
        for (pk, ehk, data) in records {
            let mut record = Vec::new();
            varint(&mut record, 1 << 3);
            varint(&mut record, *pk);
            if let Some(ehk) = ehk {
                varint(&mut record, 2 << 3);
                varint(&mut record, *ehk);
            }
            bytes_field(&mut record, 3, data);
            // A tag, which is ignored.
            bytes_field(&mut record, 4, &[10, 1, b'k']);
            bytes_field(&mut body, 3, &record);
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&body);
        out.extend_from_slice(&Md5::digest(&body));
        Bytes::from(out)
    }

    #[test]
    fn user_records_come_out_with_their_own_keys() {
        let data = aggregate(
            &["a", "b"],
            &["12345"],
            &[(0, None, b"one"), (1, Some(0), b"two"), (0, None, b"")],
        );
        let records = deaggregate(&data).unwrap().unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].partition_key, "a");
        assert_eq!(&records[0].data[..], b"one");
        assert_eq!(records[1].partition_key, "b");
        assert_eq!(records[1].explicit_hash_key.as_deref(), Some("12345"));
        assert_eq!(&records[1].data[..], b"two");
        assert!(records[2].data.is_empty());
    }

    #[test]
    fn plain_records_are_not_aggregates() {
        assert!(deaggregate(&Bytes::from_static(b"{\"a\":1}")).is_none());
    }

    #[test]
    fn a_bad_digest_or_message_is_an_error_not_a_panic() {
        let good = aggregate(&["a"], &[], &[(0, None, b"x")]);
        let mut bad_digest = good.to_vec();
        *bad_digest.last_mut().unwrap() ^= 1;
        assert_eq!(
            deaggregate(&Bytes::from(bad_digest)),
            Some(Err(KplError::BadDigest))
        );
        assert!(matches!(
            deaggregate(&Bytes::from_static(&MAGIC)),
            Some(Err(KplError::TooShort(4)))
        ));
        assert_eq!(
            deaggregate(&aggregate(&["a"], &[], &[])),
            Some(Err(KplError::Empty)),
            "an aggregate without user records is not one"
        );
        // Every truncation of a valid body, re-digested, is rejected or
        // parsed, never a panic.
        let body = &good[4..good.len() - 16];
        for cut in 0..body.len() {
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&body[..cut]);
            out.extend_from_slice(&Md5::digest(&body[..cut]));
            let _ = deaggregate(&Bytes::from(out));
        }
        // A record pointing past the key table.
        let out_of_table = aggregate(&["a"], &[], &[(3, None, b"x")]);
        assert!(matches!(
            deaggregate(&out_of_table),
            Some(Err(KplError::BadIndex { index: 3, .. }))
        ));
    }

    #[test]
    fn hash_keys_are_explicit_or_the_md5_of_the_partition_key() {
        assert_eq!(hash_key("x", Some("42")), Some(42));
        assert_eq!(hash_key("x", Some("-1")), None);
        assert_eq!(
            hash_key("x", Some("340282366920938463463374607431768211456")),
            None,
            "2^128 is out of range"
        );
        // MD5("123") = 202cb962ac59075b964b07152d234b70
        assert_eq!(
            hash_key("123", None),
            Some(0x202cb962ac59075b964b07152d234b70)
        );
    }
}
