//! Bad input gets a clear error and loses nothing: failed records are kept
//! as dead letters with their bytes unchanged, the service goes on, and the
//! checkpoint moves past them. Broken chains and configs are reported whole.

mod common;

use std::time::Duration;

use common::*;

const PICKY_CONVERTER: &str = r#"
var data = decodeToJson(payload);
if (data.explode) throw new Error("converter exploded on purpose");
if (data.hang) { while (true) {} }
if (data.hog) { var a = []; while (true) a.push("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" + a.length); }
return { deviceName: data.devName, deviceType: data.devType, telemetry: { temperature: data.temperature } };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_records_become_dead_letters_and_consumption_goes_on() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "bad", 1).await;

    let not_json: Vec<u8> = vec![0xff, 0x00, 0xfe, b'{', b'x'];
    let inputs: Vec<(String, Vec<u8>)> = vec![
        (
            "k".into(),
            br#"{"devName": "good-1", "devType": "t", "temperature": 1}"#.to_vec(),
        ),
        ("k".into(), not_json.clone()),
        ("k".into(), br#"{"devName": "x", "explode": true}"#.to_vec()),
        ("k".into(), br#"{"devName": "x", "hang": true}"#.to_vec()),
        ("k".into(), br#"{"devName": "x", "hog": true}"#.to_vec()),
        (
            "k".into(),
            br#"{"devType": "t", "temperature": 5}"#.to_vec(),
        ),
        (
            "k".into(),
            br#"{"devName": "good-2", "devType": "t", "temperature": 2}"#.to_vec(),
        ),
    ];
    for (key, data) in &inputs {
        put(&kinesis, "bad", key, data).await;
    }

    let mut setup = Setup::walkthrough("bad");
    setup.uplink_converter = PICKY_CONVERTER.into();
    setup.extra = "[js]\ncall_timeout_ms = 2000\nmemory_limit_mb = 16\n".into();
    let mut service = Service::start(&setup, &emulator).await;

    service.wait_device("good-2").await;
    wait_for("five dead letters", Duration::from_secs(30), || async {
        (service.count("dead_letters") == 5).then_some(())
    })
    .await;

    let db = service.db();
    let mut stmt = db
        .prepare(
            "SELECT payload, error, stream, shard, sequence_number FROM dead_letters ORDER BY id",
        )
        .unwrap();
    let rows: Vec<(Vec<u8>, String, String, String, String)> = stmt
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let all = read_all(&kinesis, "bad").await;
    for (row, index) in rows.iter().zip([1usize, 2, 3, 4, 5]) {
        assert_eq!(row.0, inputs[index].1, "bytes kept unchanged");
        assert_eq!(row.2, "bad");
        assert_eq!(row.3, "shardId-000000000000");
        assert_eq!(row.4, all[index].sequence_number());
    }
    assert!(rows[0].1.contains("SyntaxError"), "{}", rows[0].1);
    assert!(
        rows[1].1.contains("converter exploded on purpose"),
        "{}",
        rows[1].1
    );
    assert!(rows[2].1.contains("ran longer than"), "{}", rows[2].1);
    assert!(rows[3].1.contains("memory limit"), "{}", rows[3].1);
    assert!(rows[4].1.contains("deviceName"), "{}", rows[4].1);

    // The log names integration, shard and sequence number of each failure.
    let log = service.log();
    assert!(log.contains("record not processed"), "{log}");
    assert!(log.contains(all[2].sequence_number()), "{log}");

    // Nothing was stored for the failed records, the good ones were.
    let (status, _) = service.get("/api/tenant/devices?deviceName=x").await;
    assert_eq!(status, 404);
    service.wait_device("good-1").await;

    // The checkpoint moved past every record.
    let last = all.last().unwrap().sequence_number().to_string();
    wait_for(
        "checkpoint past the failures",
        Duration::from_secs(30),
        || async {
            let checkpoint: Option<String> = service
                .db()
                .query_row("SELECT sequence_number FROM checkpoints", [], |r| r.get(0))
                .ok();
            (checkpoint.as_deref() == Some(last.as_str())).then_some(())
        },
    )
    .await;

    // And the service keeps consuming.
    put(
        &kinesis,
        "bad",
        "k",
        br#"{"devName": "good-3", "devType": "t", "temperature": 3}"#,
    )
    .await;
    service.wait_device("good-3").await;
}

fn check(dir: &std::path::Path) -> (i32, String) {
    let (code, text) = run_binary(&["check"], &dir.join("shardflow.toml"));
    (code.unwrap_or(-1), text)
}

#[test]
fn a_broken_chain_is_reported_with_file_node_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::walkthrough("s");
    let mut chain: serde_json::Value = serde_json::from_str(&setup.root_chain).unwrap();
    chain["metadata"]["nodes"][4]["type"] =
        "org.thingsboard.rule.engine.action.TbMadeUpNode".into();
    chain["metadata"]["connections"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"fromIndex": 0, "toIndex": 42, "type": "Other"}));
    setup.root_chain = chain.to_string();
    write_config(dir.path(), &setup, "http://127.0.0.1:1", free_port());

    let (code, text) = check(dir.path());
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("rulechains/root.json"), "{text}");
    assert!(
        text.contains("Log Other") && text.contains("TbMadeUpNode"),
        "{text}"
    );
    assert!(text.contains("42") && text.contains("dangling"), "{text}");

    // `run` refuses to start with the same report.
    let output = std::process::Command::new(binary())
        .args(["run", "--config"])
        .arg(dir.path().join("shardflow.toml"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("TbMadeUpNode") && stderr.contains("dangling"),
        "{stderr}"
    );
}

#[test]
fn a_converter_that_does_not_compile_is_reported_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::walkthrough("s");
    setup.uplink_converter = "return {deviceName: 'x' ;".into();
    write_config(dir.path(), &setup, "http://127.0.0.1:1", free_port());
    let (code, text) = check(dir.path());
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("converters/uplink.js") && text.contains("SyntaxError"),
        "{text}"
    );
}

#[test]
fn a_config_with_three_mistakes_reports_all_three() {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &Setup::walkthrough("s"),
        "http://127.0.0.1:1",
        free_port(),
    );
    let path = dir.path().join("shardflow.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            "initial_position = \"TRIM_HORIZON\"",
            "initial_position = \"OLDEST\"",
        )
        .replace("max_records = 500", "max_records = 50000")
        .replace(
            "uplink_converter = \"converters/uplink.js\"",
            "uplink_converter = \"converters/missing.js\"",
        );
    std::fs::write(&path, text).unwrap();

    // The chain is broken too: reported in the same run.
    let chain = dir.path().join("rulechains/root.json");
    let broken = std::fs::read_to_string(&chain)
        .unwrap()
        .replace("TbMsgTypeSwitchNode", "TbNoSuchNode");
    std::fs::write(&chain, broken).unwrap();

    let (code, text) = check(dir.path());
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("3 problem(s)"), "{text}");
    assert!(text.contains("TbNoSuchNode"), "{text}");
    assert!(text.contains("OLDEST"), "{text}");
    assert!(text.contains("max_records = 50000"), "{text}");
    assert!(text.contains("missing.js"), "{text}");
}
