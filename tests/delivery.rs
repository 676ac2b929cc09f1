//! At-least-once delivery: every record stored, none lost across restarts
//! (graceful or SIGKILL), checkpoints that only cover finished records.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A converter for records `{"dev": NAME, "ts": MILLIS, "seq": N}`.
const SEQ_CONVERTER: &str = r#"
var data = decodeToJson(payload);
return {
    deviceName: data.dev,
    deviceType: "counter",
    telemetry: { ts: data.ts, values: { seq: data.seq } }
};
"#;

const BASE_TS: i64 = 1_700_000_000_000;

fn records(count: usize, devices: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let dev = format!("dev-{}", i % devices);
            let body = json!({"dev": dev, "ts": BASE_TS + i as i64, "seq": i});
            (dev, body.to_string().into_bytes())
        })
        .collect()
}

fn seq_setup(stream: &str) -> Setup {
    let mut setup = Setup::walkthrough(stream);
    setup.uplink_converter = SEQ_CONVERTER.into();
    setup
}

/// Every stored `seq` value with its ts, from the SQLite history table.
fn stored(service: &Service) -> Vec<(i64, i64)> {
    let db = service.db();
    let mut stmt = db
        .prepare("SELECT ts, long_v FROM ts_kv WHERE key = 'seq' ORDER BY ts")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

async fn wait_stored(service: &Service, expected: usize) {
    wait_for(
        "every record to be stored",
        Duration::from_secs(120),
        || async { (stored(service).len() >= expected).then_some(()) },
    )
    .await;
}

fn assert_exactly_once(service: &Service, count: usize) {
    let rows = stored(service);
    let seqs: HashSet<i64> = rows.iter().map(|(_, seq)| *seq).collect();
    assert_eq!(rows.len(), count, "history rows");
    assert_eq!(seqs.len(), count, "distinct records");
    for (ts, seq) in rows {
        assert_eq!(ts, BASE_TS + seq, "record stored under its own ts");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_records_over_four_shards_are_stored_once_with_newest_latest() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "load", 4).await;
    let input = records(1000, 10);
    put_many(&kinesis, "load", &input).await;

    let mut service = Service::start(&seq_setup("load"), &emulator).await;
    wait_stored(&service, 1000).await;
    assert_exactly_once(&service, 1000);

    // The latest value of each device is its newest record.
    let mut newest: HashMap<String, i64> = HashMap::new();
    for i in 0..1000usize {
        newest.insert(format!("dev-{}", i % 10), i as i64);
    }
    for (device, seq) in newest {
        let body = service.wait_device(&device).await;
        let id = body["id"]["id"].as_str().unwrap().to_string();
        let latest = service.latest(&id, true).await;
        assert_eq!(latest["seq"][0]["value"], json!(seq), "{device}");
        assert_eq!(latest["seq"][0]["ts"], json!(BASE_TS + seq), "{device}");
    }

    // Each shard's checkpoint is its last record.
    let by_shard = read_by_shard(&kinesis, "load").await;
    assert!(by_shard.values().filter(|r| !r.is_empty()).count() >= 2);
    for (shard, records) in by_shard {
        let Some(last) = records.last() else { continue };
        let expected = last.sequence_number().to_string();
        wait_for(
            "the shard's checkpoint to reach its last record",
            Duration::from_secs(30),
            || {
                let (service, shard, expected) = (&service, shard.clone(), expected.clone());
                async move {
                    let checkpoint: Option<String> = service
                        .db()
                        .query_row(
                            "SELECT sequence_number FROM checkpoints WHERE shard = ?1",
                            [&shard],
                            |r| r.get(0),
                        )
                        .ok();
                    (checkpoint == Some(expected)).then_some(())
                }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_no_record() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "crash", 2).await;
    put_many(&kinesis, "crash", &records(3000, 20)).await;

    let dir = tempfile::tempdir().unwrap();
    let setup = seq_setup("crash");
    let mut service = Service::start_in(dir.path(), &setup, &emulator).await;
    wait_for("some records stored", Duration::from_secs(60), || async {
        (!stored(&service).is_empty()).then_some(())
    })
    .await;
    service.kill();

    // More records arrive while it is down.
    let late: Vec<(String, Vec<u8>)> = (3000..3500)
        .map(|i| {
            let body =
                json!({"dev": format!("dev-{}", i % 20), "ts": BASE_TS + i as i64, "seq": i});
            (format!("dev-{}", i % 20), body.to_string().into_bytes())
        })
        .collect();
    put_many(&kinesis, "crash", &late).await;

    let service = Service::start_in(dir.path(), &setup, &emulator).await;
    wait_stored(&service, 3500).await;
    assert_exactly_once(&service, 3500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_restart_resumes_after_the_checkpoint() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "graceful", 1).await;
    put_many(&kinesis, "graceful", &records(500, 5)).await;

    let dir = tempfile::tempdir().unwrap();
    let setup = seq_setup("graceful");
    let mut service = Service::start_in(dir.path(), &setup, &emulator).await;
    wait_stored(&service, 500).await;
    let status = service.stop();
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status:?}\n{}",
        service.log()
    );

    // The checkpoint is the last record's sequence number.
    let all = read_all(&kinesis, "graceful").await;
    let last = all.last().unwrap().sequence_number().to_string();
    let checkpoint: String = service
        .db()
        .query_row("SELECT sequence_number FROM checkpoints", [], |r| r.get(0))
        .unwrap();
    assert_eq!(checkpoint, last);

    // After a restart only new records are read: mark them apart with a
    // converter that tags what it decodes.
    let mut tagged = setup.clone();
    tagged.uplink_converter =
        SEQ_CONVERTER.replace("seq: data.seq", "seq: data.seq, second_run: true");
    put_many(
        &kinesis,
        "graceful",
        &[(
            "dev-0".into(),
            json!({"dev": "dev-0", "ts": BASE_TS + 500, "seq": 500})
                .to_string()
                .into_bytes(),
        )],
    )
    .await;
    let mut service = Service::start_in(dir.path(), &tagged, &emulator).await;
    wait_stored(&service, 501).await;
    let second_run: i64 = service
        .db()
        .query_row(
            "SELECT count(*) FROM ts_kv WHERE key = 'second_run'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(second_run, 1, "only the new record was read again");
    let (_, body) = service.get("/api/tenant/devices?deviceName=dev-0").await;
    assert_eq!(body["name"], Value::from("dev-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deleted_and_created_again_is_read_from_its_start() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "again", 1).await;
    put_many(&kinesis, "again", &records(50, 5)).await;

    let dir = tempfile::tempdir().unwrap();
    let setup = seq_setup("again");
    let mut service = Service::start_in(dir.path(), &setup, &emulator).await;
    wait_stored(&service, 50).await;
    assert!(service.stop().success());

    recreate_stream(&kinesis, "again", 1).await;
    let fresh: Vec<(String, Vec<u8>)> = (50..60)
        .map(|i| {
            let body = json!({"dev": "dev-0", "ts": BASE_TS + i as i64, "seq": i});
            ("dev-0".to_string(), body.to_string().into_bytes())
        })
        .collect();
    put_many(&kinesis, "again", &fresh).await;

    let service = Service::start_in(dir.path(), &setup, &emulator).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stored(&service).len() < 60 {
        assert!(
            std::time::Instant::now() < deadline,
            "not all stored:\n{}",
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_exactly_once(&service, 60);
    assert!(
        service.log().contains("deleted and created again"),
        "{}",
        service.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_first_record_does_not_skip_what_arrived_at_latest() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "latest", 1).await;

    let dir = tempfile::tempdir().unwrap();
    let mut setup = seq_setup("latest");
    setup.initial_position = "LATEST";
    let mut service = Service::start_in(dir.path(), &setup, &emulator).await;
    service.kill();

    // Records arrive while it is down (arrival times have whole-second
    // resolution in the emulator).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    put_many(&kinesis, "latest", &records(20, 2)).await;

    let service = Service::start_in(dir.path(), &setup, &emulator).await;
    wait_stored(&service, 20).await;
    assert_exactly_once(&service, 20);
}
