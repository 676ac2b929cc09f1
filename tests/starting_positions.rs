//! Where a shard without checkpoint starts (LATEST, TRIM_HORIZON,
//! AT_TIMESTAMP), and that a stored checkpoint always wins over the
//! configured position. Against the emulator, with the real binary.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::json;

const BASE_TS: i64 = 1_700_000_000_000;

const CONVERTER: &str = r#"
var data = decodeToJson(payload);
return { deviceName: "dev", telemetry: { ts: data.ts, values: { seq: data.seq } } };
"#;

fn records(from: i64, to: i64) -> Vec<(String, Vec<u8>)> {
    (from..to)
        .map(|i| {
            let body = json!({"ts": BASE_TS + i, "seq": i});
            (format!("k{i}"), body.to_string().into_bytes())
        })
        .collect()
}

fn setup(stream: &str, position: &'static str) -> Setup {
    let mut setup = Setup::walkthrough(stream);
    setup.uplink_converter = CONVERTER.into();
    setup.initial_position = position;
    setup
}

fn stored(service: &Service) -> BTreeSet<i64> {
    let db = service.db();
    let mut stmt = db
        .prepare("SELECT long_v FROM ts_kv WHERE key = 'seq'")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

/// Waits until `expected` is stored, then for the checkpoints to settle,
/// and returns everything stored.
async fn stored_once_settled(service: &Service, expected: &BTreeSet<i64>) -> BTreeSet<i64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !stored(service).is_superset(expected) {
        assert!(
            std::time::Instant::now() < deadline,
            "stored {:?}, expected {expected:?}\n{}",
            stored(service),
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stored(service)
}

fn range(from: i64, to: i64) -> BTreeSet<i64> {
    (from..to).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_horizon_reads_what_was_there_before_the_start() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "horizon", 2).await;
    put_many(&kinesis, "horizon", &records(0, 40)).await;
    let mut service = Service::start(&setup("horizon", "TRIM_HORIZON"), &emulator).await;
    assert_eq!(
        stored_once_settled(&service, &range(0, 40)).await,
        range(0, 40)
    );
    assert!(service.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_skips_what_was_there_before_the_start() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "latest", 2).await;
    put_many(&kinesis, "latest", &records(0, 40)).await;
    // Ready means every shard has its LATEST iterator.
    let mut service = Service::start(&setup("latest", "LATEST"), &emulator).await;
    put_many(&kinesis, "latest", &records(40, 60)).await;
    let seen = stored_once_settled(&service, &range(40, 60)).await;
    assert!(service.stop().success());
    assert_eq!(
        stored(&service),
        range(40, 60),
        "nothing from before the start: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_timestamp_starts_at_the_configured_time() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "at", 2).await;
    put_many(&kinesis, "at", &records(0, 30)).await;
    // Arrival times have whole-second resolution in the emulator: leave a
    // clear second on each side of the timestamp.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let from = shardflow::msg::now_millis();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    put_many(&kinesis, "at", &records(30, 50)).await;

    let mut setup = setup("at", "AT_TIMESTAMP");
    setup.integration_extra = format!("initial_timestamp = {from}");
    let mut service = Service::start(&setup, &emulator).await;
    stored_once_settled(&service, &range(30, 50)).await;
    assert!(service.stop().success());
    assert_eq!(stored(&service), range(30, 50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_checkpoint_wins_over_the_configured_position() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "wins", 1).await;
    put_many(&kinesis, "wins", &records(0, 20)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut service =
        Service::start_in(dir.path(), &setup("wins", "TRIM_HORIZON"), &emulator).await;
    stored_once_settled(&service, &range(0, 20)).await;
    assert!(service.stop().success());

    // Records put while it is down are read although the position is now
    // LATEST (which would skip them), and the first ones are not re-read
    // although it is then AT_TIMESTAMP 0 (which would re-read everything).
    // A converter that tags what it decodes tells re-reads apart.
    let tag = |setup: &mut Setup, run: i64| {
        setup.uplink_converter =
            CONVERTER.replace("seq: data.seq", &format!("seq: data.seq, run: {run}"));
    };
    put_many(&kinesis, "wins", &records(20, 30)).await;
    let mut latest = setup("wins", "LATEST");
    tag(&mut latest, 2);
    let mut service = Service::start_in(dir.path(), &latest, &emulator).await;
    stored_once_settled(&service, &range(0, 30)).await;
    assert!(service.stop().success());

    put_many(&kinesis, "wins", &records(30, 35)).await;
    let mut at_zero = setup("wins", "AT_TIMESTAMP");
    at_zero.integration_extra = "initial_timestamp = 0".into();
    tag(&mut at_zero, 3);
    let mut service = Service::start_in(dir.path(), &at_zero, &emulator).await;
    stored_once_settled(&service, &range(0, 35)).await;
    assert!(service.stop().success());

    let runs: Vec<(i64, i64)> = {
        let db = service.db();
        let mut stmt = db
            .prepare(
                "SELECT s.long_v, r.long_v FROM ts_kv s JOIN ts_kv r
                   ON r.entity_id = s.entity_id AND r.ts = s.ts AND r.key = 'run'
                 WHERE s.key = 'seq' ORDER BY s.long_v",
            )
            .unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.map(Result::unwrap).collect()
    };
    let expected: Vec<(i64, i64)> = (20..30)
        .map(|s| (s, 2))
        .chain((30..35).map(|s| (s, 3)))
        .collect();
    assert_eq!(
        runs, expected,
        "each run read only what came after the checkpoint"
    );
}
