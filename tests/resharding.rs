//! Resharding while records flow: a split and then a merge of a live
//! stream. Every record is stored once, and a shard made by a split or
//! merge is read only after its parents are finished.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const CONVERTER: &str = r#"
var data = decodeToJson(payload);
return { deviceName: data.dev, telemetry: { ts: data.ts, values: { seq: data.seq } } };
"#;

const BASE_TS: i64 = 1_700_000_000_000;

fn batch(from: usize, to: usize) -> Vec<(String, Vec<u8>)> {
    (from..to)
        .map(|i| {
            let key = format!("key-{}", i % 30);
            let body = json!({"dev": key, "ts": BASE_TS + i as i64, "seq": i});
            (key, body.to_string().into_bytes())
        })
        .collect()
}

async fn wait_active(kinesis: &aws_sdk_kinesis::Client, stream: &str) {
    wait_for("stream ACTIVE again", Duration::from_secs(30), || async {
        let out = kinesis
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .ok()?;
        (out.stream_description_summary()?.stream_status().as_str() == "ACTIVE").then_some(())
    })
    .await;
}

/// The line number of the first log line containing all of `parts`.
fn line_of(log: &str, parts: &[&str]) -> Option<usize> {
    log.lines()
        .position(|line| parts.iter().all(|p| line.contains(p)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_while_running_lose_nothing_and_read_parents_first() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "reshard", 1).await;
    put_many(&kinesis, "reshard", &batch(0, 300)).await;

    let mut setup = Setup::walkthrough("reshard");
    setup.uplink_converter = CONVERTER.into();
    let service = Service::start(&setup, &emulator).await;
    wait_distinct_seqs(&service, 300).await;

    // Split the only shard in two halves of the hash key space.
    kinesis
        .split_shard()
        .stream_name("reshard")
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key("170141183460469231731687303715884105728")
        .send()
        .await
        .unwrap();
    wait_active(&kinesis, "reshard").await;
    put_many(&kinesis, "reshard", &batch(300, 600)).await;
    wait_distinct_seqs(&service, 600).await;

    // Merge the two children back into one.
    let shards = kinesis
        .list_shards()
        .stream_name("reshard")
        .send()
        .await
        .unwrap();
    let children: Vec<String> = shards
        .shards()
        .iter()
        .filter(|s| s.parent_shard_id() == Some("shardId-000000000000"))
        .map(|s| s.shard_id().to_string())
        .collect();
    assert_eq!(children.len(), 2);
    kinesis
        .merge_shards()
        .stream_name("reshard")
        .shard_to_merge(&children[0])
        .adjacent_shard_to_merge(&children[1])
        .send()
        .await
        .unwrap();
    wait_active(&kinesis, "reshard").await;
    put_many(&kinesis, "reshard", &batch(600, 900)).await;
    wait_distinct_seqs(&service, 900).await;

    let rows: i64 = service
        .db()
        .query_row("SELECT count(*) FROM ts_kv WHERE key = 'seq'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(rows, 900, "each record stored once");

    // Parents finish before their children start.
    let log = service.log();
    let parent_done =
        line_of(&log, &["shard finished", "shardId-000000000000"]).expect("parent finished");
    for child in &children {
        let child_start = line_of(&log, &["shard consumer started", child]).expect("child started");
        assert!(
            parent_done < child_start,
            "{child} started before its parent finished\n{log}"
        );
    }
    let merged: Vec<String> = kinesis
        .list_shards()
        .stream_name("reshard")
        .send()
        .await
        .unwrap()
        .shards()
        .iter()
        .filter(|s| s.adjacent_parent_shard_id().is_some())
        .map(|s| s.shard_id().to_string())
        .collect();
    assert_eq!(merged.len(), 1);
    let merged_start =
        line_of(&log, &["shard consumer started", &merged[0]]).expect("merged shard started");
    for child in &children {
        let child_done = line_of(&log, &["shard finished", child]).expect("child finished");
        assert!(
            child_done < merged_start,
            "merged shard started before {child} finished\n{log}"
        );
    }
}
