//! Dead letters from the command line: list, show, replay after the
//! converter was fixed (once only), purge.

mod common;

use std::time::Duration;

use common::*;

const STRICT: &str = r#"
var data = decodeToJson(payload);
if (data.kind === "new") throw new Error("kind 'new' is not supported yet");
return { deviceName: data.dev, telemetry: { ts: data.ts, values: { v: data.v } } };
"#;

const FIXED: &str = r#"
var data = decodeToJson(payload);
return { deviceName: data.dev, telemetry: { ts: data.ts, values: { v: data.v } } };
"#;

fn dlq(service: &Service, args: &[&str]) -> (bool, String) {
    let args: Vec<&str> = std::iter::once("dlq").chain(args.iter().copied()).collect();
    let (code, text) = run_binary(&args, &service.dir.join("shardflow.toml"));
    (code == Some(0), text)
}

fn replayed(service: &Service) -> i64 {
    service
        .db()
        .query_row(
            "SELECT count(*) FROM dead_letters WHERE replayed_ms IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_once_after_a_fix_and_purged() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "dlq", 1).await;
    for (dev, kind, v) in [
        ("old-1", "old", 1),
        ("new-1", "new", 2),
        ("new-2", "new", 3),
    ] {
        let body =
            format!(r#"{{"dev": "{dev}", "kind": "{kind}", "ts": 1700000000000, "v": {v}}}"#);
        put(&kinesis, "dlq", "k", body.as_bytes()).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::walkthrough("dlq");
    setup.uplink_converter = STRICT.into();
    let mut service = Service::start_in(dir.path(), &setup, &emulator).await;
    service.wait_device("old-1").await;
    wait_for("two dead letters", Duration::from_secs(30), || async {
        (service.count("dead_letters") == 2).then_some(())
    })
    .await;

    let (ok, listed) = dlq(&service, &["list"]);
    assert!(ok, "{listed}");
    assert!(
        listed.contains("not supported yet") && listed.contains("kinesis_integration"),
        "{listed}"
    );
    let (ok, shown) = dlq(&service, &["show", "1"]);
    assert!(ok, "{shown}");
    assert!(shown.contains(r#"\"dev\": \"new-1\""#), "{shown}");

    // Fix the converter, restart, replay.
    assert!(service.stop().success());
    setup.uplink_converter = FIXED.into();
    let mut service = Service::start_in(dir.path(), &setup, &emulator).await;
    let (ok, report) = dlq(&service, &["replay"]);
    assert!(ok, "{report}");
    assert!(
        report.contains("\"replayed\": [\n    1,\n    2\n  ]"),
        "{report}"
    );
    service.wait_device("new-1").await;
    service.wait_device("new-2").await;
    wait_for("both marked replayed", Duration::from_secs(30), || async {
        (replayed(&service) == 2).then_some(())
    })
    .await;

    // A second replay does nothing.
    let (ok, report) = dlq(&service, &["replay"]);
    assert!(ok, "{report}");
    assert!(report.contains("\"replayed\": []"), "{report}");

    let (ok, text) = dlq(&service, &["purge", "--all"]);
    assert!(ok, "{text}");
    assert_eq!(service.count("dead_letters"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_the_oldest_dead_letters_beyond_the_cap() {
    use shardflow::delivery::SourceRecord;
    use shardflow::store::{DeadLetterFilter, Store, Write};

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for i in 0..5 {
        let source = SourceRecord {
            integration: "i".into(),
            sequence_number: i.to_string(),
            ..Default::default()
        };
        store
            .write(
                vec![Write::dead_letter(&source, "bad".into(), None, None, None)],
                None,
            )
            .await
            .unwrap();
    }
    assert_eq!(store.trim_dead_letters(2, 0).await.unwrap(), 3);
    let left = store
        .dead_letters(&DeadLetterFilter {
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    let sequence_numbers: Vec<&str> = left.iter().map(|l| l.sequence_number.as_str()).collect();
    assert_eq!(sequence_numbers, ["3", "4"]);
    assert_eq!(store.trim_dead_letters(0, 0).await.unwrap(), 0);
}
