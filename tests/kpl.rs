//! KPL aggregated records put into the emulator (built by the encoder in
//! tests/common, not by shardflow's decoder): each user record goes through
//! the converter with its own partition key, a restart inside an aggregate
//! skips exactly the user records that were done, a record with the magic
//! but a bad digest or message is passed on as a plain record, and user
//! records outside the shard's hash key range are dropped with a count.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::json;

const BASE_TS: i64 = 1_700_000_000_000;

/// Stores `seq`, the record's partition key and its sub-sequence number;
/// throws on what is not JSON and on `{"fail": true}`.
const CONVERTER: &str = r#"
var data = JSON.parse(String.fromCharCode.apply(String, payload));
if (data.fail) { throw new Error("asked to fail"); }
var sub = metadata.subSequenceNumber === undefined ? -1 : Number(metadata.subSequenceNumber);
return { deviceName: data.dev, telemetry: { ts: data.ts, values: {
    seq: data.seq, pk: metadata.partitionKey, sub: sub,
    ehk: metadata.explicitHashKey === undefined ? "" : metadata.explicitHashKey
} } };
"#;

fn body(seq: i64) -> Vec<u8> {
    json!({"dev": "kpl", "ts": BASE_TS + seq, "seq": seq})
        .to_string()
        .into_bytes()
}

fn setup(stream: &str) -> Setup {
    let mut setup = Setup::walkthrough(stream);
    setup.uplink_converter = CONVERTER.into();
    setup
}

/// (seq, pk, sub, ehk) of every stored record, by seq.
fn stored(service: &Service) -> Vec<(i64, String, i64, String)> {
    let db = service.db();
    let mut stmt = db
        .prepare(
            "SELECT s.long_v, p.str_v, u.long_v, e.str_v FROM ts_kv s
             JOIN ts_kv p ON p.entity_id = s.entity_id AND p.ts = s.ts AND p.key = 'pk'
             JOIN ts_kv u ON u.entity_id = s.entity_id AND u.ts = s.ts AND u.key = 'sub'
             JOIN ts_kv e ON e.entity_id = s.entity_id AND e.ts = s.ts AND e.key = 'ehk'
             WHERE s.key = 'seq' ORDER BY s.long_v",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

async fn wait_count(service: &Service, what: &str, count: usize, probe: impl Fn() -> usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while probe() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {} of {count}\n{}",
            probe(),
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_records_are_taken_apart_and_bad_aggregates_pass_as_plain_records() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "kpl", 1).await;

    let first: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("pk-{i}"), body(i))).collect();
    let first_refs: Vec<(&str, Option<&str>, &[u8])> = first
        .iter()
        .map(|(k, d)| (k.as_str(), None, d.as_slice()))
        .collect();
    put(&kinesis, "kpl", "outer-1", &kpl_aggregate(&first_refs)).await;
    put(&kinesis, "kpl", "plain", &body(5)).await;
    let failing = json!({"dev": "kpl", "ts": BASE_TS + 7, "seq": 7, "fail": true})
        .to_string()
        .into_bytes();
    let (six, eight) = (body(6), body(8));
    let second = kpl_aggregate(&[
        ("pk-6", Some("12345"), &six),
        ("pk-7", None, &failing),
        ("pk-8", None, &eight),
    ]);
    let last_aggregate = put(&kinesis, "kpl", "outer-2", &second).await;

    // The magic, but a digest that does not match.
    let mut bad_digest = kpl_aggregate(&[("x", None, &body(100))]);
    *bad_digest.last_mut().unwrap() ^= 0xFF;
    put(&kinesis, "kpl", "bad-digest", &bad_digest).await;
    // The magic and a right digest of a message that is not protobuf.
    let garbage = [0x0Fu8, 0xFF, 0xFF];
    let mut bad_message = vec![0xF3, 0x89, 0x9A, 0xC2];
    bad_message.extend_from_slice(&garbage);
    use md5::Digest;
    bad_message.extend_from_slice(&md5::Md5::digest(garbage));
    let last = put(&kinesis, "kpl", "bad-message", &bad_message).await;

    let service = Service::start(&setup("kpl"), &emulator).await;
    wait_count(&service, "stored", 8, || stored(&service).len()).await;
    wait_count(&service, "dead letters", 3, || {
        service.count("dead_letters") as usize
    })
    .await;

    let rows = stored(&service);
    let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5, 6, 8], "{rows:?}");
    for (seq, pk, sub, ehk) in &rows {
        match seq {
            0..=4 => {
                assert_eq!(pk, &format!("pk-{seq}"));
                assert_eq!(*sub, *seq);
                assert_eq!(ehk, "");
            }
            5 => assert_eq!((pk.as_str(), *sub), ("plain", -1)),
            6 => assert_eq!((pk.as_str(), *sub, ehk.as_str()), ("pk-6", 0, "12345")),
            8 => assert_eq!((pk.as_str(), *sub), ("pk-8", 2)),
            _ => unreachable!(),
        }
    }

    // Dead letters keep the bytes of what failed: the user record alone,
    // or the whole record that only looked like an aggregate.
    let db = service.db();
    let mut stmt = db
        .prepare(
            "SELECT sequence_number, sub_sequence_number, partition_key, payload
             FROM dead_letters ORDER BY id",
        )
        .unwrap();
    let letters: Vec<(String, Option<i64>, String, Vec<u8>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert_eq!(letters[0].0, last_aggregate);
    assert_eq!(letters[0].1, Some(1));
    assert_eq!(letters[0].2, "pk-7");
    assert_eq!(letters[0].3, failing);
    assert_eq!((letters[1].1, letters[1].3.clone()), (None, bad_digest));
    assert_eq!((letters[2].1, letters[2].3.clone()), (None, bad_message));
    let log = service.log();
    assert_eq!(
        log.matches("starts like a KPL aggregate but is not one")
            .count(),
        2,
        "{log}"
    );

    // Everything done: the checkpoint is the last record, whole.
    wait_for(
        "checkpoint on the last record",
        Duration::from_secs(30),
        || async {
            let (sequence, sub): (Option<String>, Option<i64>) = service
                .db()
                .query_row(
                    "SELECT sequence_number, sub_sequence_number FROM checkpoints",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .ok()?;
            (sequence.as_deref() == Some(last.as_str()) && sub.is_none()).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_inside_an_aggregate_resumes_after_exactly_the_user_records_done() {
    const USERS: i64 = 2000;
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "kpl-crash", 1).await;
    let bodies: Vec<Vec<u8>> = (0..USERS).map(body).collect();
    let users: Vec<(&str, Option<&str>, &[u8])> = bodies
        .iter()
        .map(|d| ("same-key", None, d.as_slice()))
        .collect();
    let sequence = put(&kinesis, "kpl-crash", "outer", &kpl_aggregate(&users)).await;

    // A slow converter, so that the kill lands inside the aggregate.
    let mut slow = setup("kpl-crash");
    slow.uplink_converter =
        format!("var until = Date.now() + 3; while (Date.now() < until) {{}}\n{CONVERTER}");
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start_in(dir.path(), &slow, &emulator).await;
    let inside: i64 = wait_for(
        "a checkpoint inside the aggregate",
        Duration::from_secs(90),
        || async {
            service
                .db()
                .query_row(
                    "SELECT sub_sequence_number FROM checkpoints WHERE sub_sequence_number IS NOT NULL",
                    [],
                    |r| r.get(0),
                )
                .ok()
        },
    )
    .await;
    service.kill();
    let (checkpoint, done_through): (String, i64) = service
        .db()
        .query_row(
            "SELECT sequence_number, sub_sequence_number FROM checkpoints",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(checkpoint, sequence);
    assert!(done_through >= inside && done_through < USERS - 1);

    // The second run marks what it decodes.
    let mut tagged = setup("kpl-crash");
    tagged.uplink_converter = CONVERTER.replace("seq: data.seq,", "seq: data.seq, second_run: 1,");
    let service = Service::start_in(dir.path(), &tagged, &emulator).await;
    let second_run = || -> BTreeSet<i64> {
        let db = service.db();
        let mut stmt = db
            .prepare(
                "SELECT s.long_v FROM ts_kv s JOIN ts_kv r
                   ON r.entity_id = s.entity_id AND r.ts = s.ts AND r.key = 'second_run'
                 WHERE s.key = 'seq'",
            )
            .unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    let expected: BTreeSet<i64> = (done_through + 1..USERS).collect();
    wait_count(&service, "re-read user records", expected.len(), || {
        second_run().len()
    })
    .await;
    assert_eq!(
        second_run(),
        expected,
        "only the user records after the checkpoint are read again"
    );
    let all: BTreeSet<i64> = stored(&service).into_iter().map(|r| r.0).collect();
    assert_eq!(all, (0..USERS).collect::<BTreeSet<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_records_outside_the_shards_hash_range_are_dropped_and_counted() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "kpl-split", 1).await;
    kinesis
        .split_shard()
        .stream_name("kpl-split")
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key("170141183460469231731687303715884105728")
        .send()
        .await
        .unwrap();
    wait_for(
        "stream ACTIVE after the split",
        Duration::from_secs(30),
        || async {
            let out = kinesis
                .describe_stream_summary()
                .stream_name("kpl-split")
                .send()
                .await
                .ok()?;
            (out.stream_description_summary()?.stream_status().as_str() == "ACTIVE").then_some(())
        },
    )
    .await;
    let shards = kinesis
        .list_shards()
        .stream_name("kpl-split")
        .send()
        .await
        .unwrap();
    let low = shards
        .shards()
        .iter()
        .find(|s| {
            s.parent_shard_id().is_some() && s.hash_key_range().unwrap().starting_hash_key() == "0"
        })
        .expect("the lower child")
        .shard_id()
        .to_string();

    // Partition keys whose MD5 falls in the lower half, and in the upper.
    use md5::Digest;
    let half = |key: &str| md5::Md5::digest(key.as_bytes())[0] < 0x80;
    let inside_key = (0..).map(|i| format!("k{i}")).find(|k| half(k)).unwrap();
    let outside_key = (0..).map(|i| format!("k{i}")).find(|k| !half(k)).unwrap();
    let bodies: Vec<Vec<u8>> = (0..5).map(body).collect();
    let aggregate = kpl_aggregate(&[
        ("a", Some("10"), &bodies[0]),
        (
            "b",
            Some("170141183460469231731687303715884105728"),
            &bodies[1],
        ),
        (&inside_key, None, &bodies[2]),
        (&outside_key, None, &bodies[3]),
        (
            "c",
            Some("340282366920938463463374607431768211455"),
            &bodies[4],
        ),
    ]);
    // The aggregate itself goes to the lower child.
    put_with_hash_key(&kinesis, "kpl-split", "outer", "5", &aggregate).await;

    let service = Service::start(&setup("kpl-split"), &emulator).await;
    let series = format!(
        "shardflow_user_records_dropped_total{{integration=\"kinesis_integration\",shard=\"{low}\"}} 3"
    );
    wait_for("the dropped count", Duration::from_secs(60), || async {
        metrics(&service).await.contains(&series).then_some(())
    })
    .await;
    wait_count(&service, "stored", 2, || stored(&service).len()).await;
    let seqs: Vec<i64> = stored(&service).iter().map(|r| r.0).collect();
    assert_eq!(seqs, vec![0, 2]);
    assert!(service
        .log()
        .contains("outside the shard's range were dropped"));
}
