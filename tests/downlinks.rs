//! 10,000 downlinks through the real service: a chain that sends one
//! downlink per uplink, into an emulator that enforces the shard write
//! limits (1,000 records/s per shard), so PutRecords entries are rejected
//! and retried. Every downlink arrives, and none twice unless its send was
//! reported as failed (a dead letter).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const RECORDS: i64 = 10_000;
const DEVICES: i64 = 100;

const UPLINK: &str = r#"
var data = decodeToJson(payload);
return { deviceName: data.dev, telemetry: { ts: data.ts, values: { seq: data.seq } } };
"#;

const DOWNLINK: &str = r#"
return { contentType: "JSON",
         data: JSON.stringify({ dev: metadata.deviceName, seq: msg.seq }),
         metadata: { streamName: "down", partitionKey: metadata.deviceName } };
"#;

fn chain() -> String {
    json!({
        "ruleChain": {"name": "Downlink per uplink", "root": true},
        "metadata": {
            "firstNodeIndex": 0,
            "nodes": [
                {"type": "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode",
                 "name": "Message Type Switch", "configuration": {"version": 0}},
                {"type": "org.thingsboard.rule.engine.integration.TbIntegrationDownlinkNode",
                 "name": "Integration Downlink", "configuration": {"integrationId": "kinesis_integration"}}
            ],
            "connections": [{"fromIndex": 0, "toIndex": 1, "type": "Post telemetry"}],
            "ruleChainConnections": null
        }
    })
    .to_string()
}

async fn records_done(service: &Service) -> i64 {
    metrics(service)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("shardflow_records_done_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_downlinks_arrive_once_each() {
    let emulator = Emulator::start_with(|options| options.enforce_limits = true);
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "up", 4).await;
    create_stream(&kinesis, "down", 1).await;

    let mut setup = Setup::walkthrough("up");
    setup.uplink_converter = UPLINK.into();
    setup.downlink_converter = DOWNLINK.into();
    setup.root_chain = chain();
    let service = Service::start(&setup, &emulator).await;

    let uplinks: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| {
            let dev = format!("dev-{}", i % DEVICES);
            let body = json!({"dev": dev, "ts": 1_700_000_000_000 + i, "seq": i});
            (dev, body.to_string().into_bytes())
        })
        .collect();
    put_many_retrying(&kinesis, "up", &uplinks).await;

    // Each uplink is done once its downlink was accepted or dead-lettered.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while records_done(&service).await < RECORDS {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {RECORDS} done\n{}",
            records_done(&service).await,
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let mut count: HashMap<i64, usize> = HashMap::new();
    for record in read_all(&kinesis, "down").await {
        let body: Value = serde_json::from_slice(record.data().as_ref()).unwrap();
        assert_eq!(
            record.partition_key(),
            body["dev"].as_str(),
            "partition key from the converter"
        );
        *count.entry(body["seq"].as_i64().unwrap()).or_default() += 1;
    }
    // A reported failure is a dead letter carrying the uplink's sequence
    // number; only those may have been sent twice (after a replay) or not.
    let failed: HashSet<String> = {
        let db = service.db();
        let mut stmt = db.prepare("SELECT message FROM dead_letters").unwrap();
        let rows = stmt
            .query_map([], |r| r.get::<_, Option<String>>(0))
            .unwrap();
        rows.map(|r| r.unwrap().unwrap_or_default()).collect()
    };
    assert!(failed.is_empty(), "downlinks reported failed: {failed:?}");
    let missing: Vec<i64> = (0..RECORDS).filter(|s| !count.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "{} downlinks missing: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    let twice: Vec<(&i64, &usize)> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "downlinks sent twice: {twice:?}");
    assert_eq!(count.len() as i64, RECORDS);
    let log = service.log();
    eprintln!(
        "PutRecords retries logged: {}",
        log.matches("PutRecords entries rejected").count()
    );
}
