//! A stream that is not there: missing when the service starts (a clear
//! error naming stream and region, then picked up once created), and
//! deleted while the service runs (logged and retried with back-off, no
//! busy loop, read again once created anew).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const CONVERTER: &str = r#"
var data = decodeToJson(payload);
return { deviceName: "d", telemetry: { ts: data.ts, values: { seq: data.seq } } };
"#;

const BASE_TS: i64 = 1_700_000_000_000;

fn batch(from: i64, to: i64) -> Vec<(String, Vec<u8>)> {
    (from..to)
        .map(|i| {
            let body = json!({"ts": BASE_TS + i, "seq": i});
            (format!("k{}", i % 7), body.to_string().into_bytes())
        })
        .collect()
}

fn setup(stream: &str) -> Setup {
    let mut setup = Setup::walkthrough(stream);
    setup.uplink_converter = CONVERTER.into();
    setup
}

async fn ready_status(service: &Service) -> u16 {
    service
        .http
        .get(format!("{}/ready", service.base_url))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_named_with_its_region_and_read_once_created() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    let dir = tempfile::tempdir().unwrap();
    let service = Service::launch_in(dir.path(), &setup("late"), &emulator);

    let log = wait_for("the missing stream named", Duration::from_secs(30), || {
        let log = service.log();
        async move {
            log.contains("stream \"late\" not found in region us-east-1")
                .then_some(log)
        }
    })
    .await;
    assert!(log.contains("ERROR"), "{log}");
    assert_eq!(
        ready_status(&service).await,
        503,
        "not ready without its stream"
    );

    create_stream(&kinesis, "late", 2).await;
    put_many(&kinesis, "late", &batch(0, 40)).await;
    wait_distinct_seqs(&service, 40).await;
    service.wait_ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deleted_while_running_is_retried_without_spinning_and_read_when_back() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "vanishing", 1).await;
    put_many(&kinesis, "vanishing", &batch(0, 30)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start_in(dir.path(), &setup("vanishing"), &emulator).await;
    wait_distinct_seqs(&service, 30).await;

    kinesis
        .delete_stream()
        .stream_name("vanishing")
        .send()
        .await
        .unwrap();
    wait_for("the deletion noticed", Duration::from_secs(30), || {
        let log = service.log();
        async move { log.contains("ResourceNotFoundException").then_some(()) }
    })
    .await;

    // Twelve seconds without the stream: retried with back-off, not in a
    // loop that keeps a core busy.
    let cpu_before = service.cpu_time();
    let lines_before = service.log().lines().count();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let cpu = service.cpu_time() - cpu_before;
    let lines = service.log().lines().count() - lines_before;
    assert!(service.running(), "{}", service.log());
    assert!(
        cpu < Duration::from_secs(3),
        "{cpu:?} of CPU in 12 s without a stream"
    );
    assert!(lines < 40, "{lines} log lines in 12 s:\n{}", service.log());
    let (status, _) = service.get("/api/tenant/devices?deviceName=d").await;
    assert_eq!(status, 200, "the API keeps serving");

    // Created again under the same name: its records are read from its
    // start; the old checkpoint does not hide them.
    create_stream(&kinesis, "vanishing", 1).await;
    put_many(&kinesis, "vanishing", &batch(30, 50)).await;
    wait_distinct_seqs(&service, 50).await;
    let rows: i64 = service
        .db()
        .query_row("SELECT count(*) FROM ts_kv WHERE key = 'seq'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(rows, 50, "each record stored once");
    assert!(
        service
            .log()
            .contains("the stream was deleted and created again"),
        "{}",
        service.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_endpoint_with_the_stream_created_anew_is_read_from_its_start() {
    let emulator = Emulator::start();
    let address = emulator.endpoint.trim_start_matches("http://").to_string();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "reborn", 1).await;
    put_many(&kinesis, "reborn", &batch(0, 30)).await;
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start_in(dir.path(), &setup("reborn"), &emulator).await;
    wait_distinct_seqs(&service, 30).await;

    // The endpoint goes away and comes back empty; the stream is created
    // again. Its sequence numbers may well be above the old checkpoint, so
    // only the creation time tells it is another stream.
    drop(emulator);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let emulator = Emulator::start_at(&address, |_| {});
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "reborn", 1).await;
    put_many(&kinesis, "reborn", &batch(30, 50)).await;
    wait_for("the new stream told apart", Duration::from_secs(60), || {
        let log = service.log();
        async move { log.contains("deleted and created again").then_some(()) }
    })
    .await;
    wait_distinct_seqs(&service, 50).await;
    // Read afresh: what came before the restart is read again, at least
    // once, never skipped.
    put_many(&kinesis, "reborn", &batch(50, 60)).await;
    wait_distinct_seqs(&service, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_again_quickly_at_latest_loses_nothing_and_drops_gone_shards() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "quick", 2).await;
    let mut setup = setup("quick");
    setup.initial_position = "LATEST";
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start_in(dir.path(), &setup, &emulator).await;

    // Gone and back between two listings, with more shards: every record
    // put into the new stream is read, also on the shard that is new.
    recreate_stream(&kinesis, "quick", 3).await;
    put_many(&kinesis, "quick", &batch(0, 60)).await;
    wait_distinct_seqs(&service, 60).await;

    // Back with fewer shards: the consumers of shards it lacks stop, and
    // the service is ready again.
    recreate_stream(&kinesis, "quick", 1).await;
    put_many(&kinesis, "quick", &batch(60, 80)).await;
    wait_distinct_seqs(&service, 80).await;
    service.wait_ready().await;
    let log = service.log();
    assert!(log.contains("deleted and created again"), "{log}");
    assert!(log.contains("created again without this shard"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_fan_out_a_stream_created_again_while_running_is_read_from_its_start() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "pushed", 1).await;
    put_many(&kinesis, "pushed", &batch(0, 30)).await;
    let mut setup = setup("pushed");
    setup.integration_extra = "use_enhanced_fan_out = true".into();
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start_in(dir.path(), &setup, &emulator).await;
    wait_distinct_seqs(&service, 30).await;

    recreate_stream(&kinesis, "pushed", 2).await;
    put_many(&kinesis, "pushed", &batch(30, 70)).await;
    wait_distinct_seqs(&service, 70).await;
    service.wait_ready().await;
}
