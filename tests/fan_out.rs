//! Enhanced fan-out against the emulator: the stream consumer is
//! registered once and reused after a restart, subscriptions that complete
//! are renewed from where they stopped (the emulator is set to end them
//! after 1.5 s instead of five minutes), and a split while records flow is
//! handled as when polling. Every record is stored once.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::json;

const BASE_TS: i64 = 1_700_000_000_000;

const CONVERTER: &str = r#"
var data = decodeToJson(payload);
return { deviceName: data.dev, telemetry: { ts: data.ts, values: { seq: data.seq } } };
"#;

fn batch(from: i64, to: i64) -> Vec<(String, Vec<u8>)> {
    (from..to)
        .map(|i| {
            let key = format!("key-{}", i % 30);
            let body = json!({"dev": key, "ts": BASE_TS + i, "seq": i});
            (key, body.to_string().into_bytes())
        })
        .collect()
}

fn setup(stream: &str) -> Setup {
    let mut setup = Setup::walkthrough(stream);
    setup.uplink_converter = CONVERTER.into();
    setup.integration_extra = "use_enhanced_fan_out = true".into();
    setup
}

/// Every stored seq, with how many history rows it has.
fn stored(service: &Service) -> Vec<(i64, i64)> {
    let db = service.db();
    let mut stmt = db
        .prepare(
            "SELECT long_v, count(*) FROM ts_kv WHERE key = 'seq' GROUP BY long_v ORDER BY long_v",
        )
        .unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.map(Result::unwrap).collect()
}

async fn wait_stored(service: &Service, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while stored(service).len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "stored {} of {count}\n{}",
            stored(service).len(),
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_once(service: &Service, count: i64) {
    let rows = stored(service);
    assert_eq!(rows.len() as i64, count, "distinct records");
    assert!(rows.iter().all(|(_, n)| *n == 1), "one row per record");
    let seqs: BTreeSet<i64> = rows.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (0..count).collect::<BTreeSet<i64>>());
}

async fn consumers(kinesis: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, String)> {
    let arn = kinesis
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .unwrap()
        .stream_description_summary()
        .unwrap()
        .stream_arn()
        .to_string();
    kinesis
        .list_stream_consumers()
        .stream_arn(arn)
        .send()
        .await
        .unwrap()
        .consumers()
        .iter()
        .map(|c| {
            (
                c.consumer_name().to_string(),
                c.consumer_status().as_str().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_arrive_through_renewed_subscriptions_and_the_consumer_is_reused() {
    let emulator = Emulator::start_with(|options| options.subscribe_to_shard_session_ms = 1500);
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "efo", 2).await;
    put_many(&kinesis, "efo", &batch(0, 200)).await;

    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start_in(dir.path(), &setup("efo"), &emulator).await;
    wait_stored(&service, 200).await;
    // Records that arrive across several subscriptions.
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        put_many(&kinesis, "efo", &batch(200 + round * 60, 260 + round * 60)).await;
    }
    wait_stored(&service, 500).await;
    assert_once(&service, 500);
    assert_eq!(
        consumers(&kinesis, "efo").await,
        vec![("shardflow-test".to_string(), "ACTIVE".to_string())]
    );
    let log = service.log();
    assert_eq!(
        log.matches("stream consumer registered").count(),
        1,
        "{log}"
    );
    assert!(service.stop().success());

    // After a restart the same consumer is used and reading resumes after
    // the checkpoint.
    put_many(&kinesis, "efo", &batch(500, 550)).await;
    let service = Service::start_in(dir.path(), &setup("efo"), &emulator).await;
    wait_stored(&service, 550).await;
    assert_once(&service, 550);
    assert!(service.log().contains("stream consumer found"));
    assert_eq!(
        consumers(&kinesis, "efo").await.len(),
        1,
        "nothing registered twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_under_fan_out_reads_parents_before_children() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "efo-split", 1).await;
    put_many(&kinesis, "efo-split", &batch(0, 150)).await;
    let service = Service::start(&setup("efo-split"), &emulator).await;
    wait_stored(&service, 150).await;

    kinesis
        .split_shard()
        .stream_name("efo-split")
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key("170141183460469231731687303715884105728")
        .send()
        .await
        .unwrap();
    wait_for("stream ACTIVE again", Duration::from_secs(30), || async {
        let out = kinesis
            .describe_stream_summary()
            .stream_name("efo-split")
            .send()
            .await
            .ok()?;
        (out.stream_description_summary()?.stream_status().as_str() == "ACTIVE").then_some(())
    })
    .await;
    put_many(&kinesis, "efo-split", &batch(150, 300)).await;
    wait_stored(&service, 300).await;
    assert_once(&service, 300);

    let log = service.log();
    let line_of = |parts: &[&str]| {
        log.lines()
            .position(|line| parts.iter().all(|p| line.contains(p)))
    };
    let parent_done =
        line_of(&["shard finished", "shardId-000000000000"]).expect("parent finished");
    for child in ["shardId-000000000001", "shardId-000000000002"] {
        let started = line_of(&["shard consumer started", child]).expect("child started");
        assert!(
            parent_done < started,
            "{child} started before its parent finished\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_again_is_read_from_its_start_under_fan_out() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "efo-again", 1).await;
    put_many(&kinesis, "efo-again", &batch(0, 50)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start_in(dir.path(), &setup("efo-again"), &emulator).await;
    wait_stored(&service, 50).await;
    assert!(service.stop().success());

    recreate_stream(&kinesis, "efo-again", 1).await;
    put_many(&kinesis, "efo-again", &batch(50, 60)).await;

    let service = Service::start_in(dir.path(), &setup("efo-again"), &emulator).await;
    wait_stored(&service, 60).await;
    assert_once(&service, 60);
    let log = service.log();
    assert!(log.contains("deleted and created again"), "{log}");
}
