//! Hot reload through the real service: records flow from the emulator
//! while the root chain and the uplink converter are rewritten again and
//! again (some edits invalid, some saved by rename, some written in
//! place); every record must be processed by one consistent version of
//! both, none lost, and the last version must win.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

const BASE_TS: i64 = 1_700_000_000_000;
const RECORDS: usize = 20_000;
const EDITS: usize = 50;
const DEVICES: usize = 20;

/// Converter version `k` stamps `conv: k` on every record.
fn converter(k: usize) -> String {
    format!(
        r#"var data = decodeToJson(payload);
return {{ deviceName: data.dev, deviceType: "sensor",
         telemetry: {{ ts: data.ts, values: {{ seq: data.seq, conv: {k} }} }} }};"#
    )
}

/// Root chain version `j` stamps `chain: j` before saving.
fn root_chain(j: usize) -> String {
    json!({"ruleChain": {"name": "Root"}, "metadata": {"firstNodeIndex": 0,
        "nodes": [
            {"type": "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode", "name": "switch",
             "configuration": {"version": 0}},
            {"type": "org.thingsboard.rule.engine.transform.TbTransformMsgNode",
             "name": format!("stamp {j}"),
             "configuration": {"jsScript": format!("msg.chain = {j}; return {{msg: msg}};")}},
            {"type": "org.thingsboard.rule.engine.telemetry.TbMsgTimeseriesNode", "name": "save",
             "configuration": {"defaultTTL": 0}}],
        "connections": [
            {"fromIndex": 0, "toIndex": 1, "type": "Post telemetry"},
            {"fromIndex": 1, "toIndex": 2, "type": "Success"}]}})
    .to_string()
}

/// Saves like an editor: a new file renamed over the old one.
fn save_by_rename(path: &Path, text: &str) {
    let temp = path.with_extension("swp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// Every stored record: (device, ts) -> (seq, conv, chain).
fn stored(service: &Service) -> BTreeMap<(String, i64), (i64, i64, i64)> {
    let db = service.db();
    let mut stmt = db
        .prepare(
            "SELECT entity_id, ts, key, long_v FROM ts_kv WHERE key IN ('seq', 'conv', 'chain')",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .unwrap();
    let mut out: BTreeMap<(String, i64), (i64, i64, i64)> = BTreeMap::new();
    for row in rows {
        let (entity, ts, key, value) = row.unwrap();
        let entry = out.entry((entity, ts)).or_insert((-1, -1, -1));
        match key.as_str() {
            "seq" => entry.0 = value,
            "conv" => entry.1 = value,
            _ => entry.2 = value,
        }
    }
    out
}

fn records(from: usize, to: usize) -> Vec<(String, Vec<u8>)> {
    (from..to)
        .map(|i| {
            let dev = format!("dev-{}", i % DEVICES);
            let body = json!({"dev": dev, "ts": BASE_TS + i as i64, "seq": i});
            (dev, body.to_string().into_bytes())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_keep_the_version_they_entered_with_across_fifty_rewrites() {
    let emulator = Emulator::start();
    let client = emulator.client().await;
    create_stream(&client, "reload", 2).await;
    let mut setup = Setup::walkthrough("reload");
    setup.uplink_converter = converter(0);
    setup.root_chain = root_chain(0);
    setup.extra = "[rules]\nreload_debounce_ms = 40\nreload_poll_ms = 1000\n".into();
    let mut service = Service::start(&setup, &emulator).await;
    let chain_file = service.dir.join("rulechains/root.json");
    let converter_file = service.dir.join("converters/uplink.js");

    // The pairs (converter, chain) that were on disk together, both valid:
    // the only sets a record may have been processed by.
    let mut allowed: HashSet<(i64, i64)> = HashSet::from([(0, 0)]);
    let producer = {
        let client = client.clone();
        tokio::spawn(async move {
            for start in (0..RECORDS).step_by(500) {
                put_many(&client, "reload", &records(start, start + 500)).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };

    let (mut conv, mut chain) = (0usize, 0usize);
    let mut invalid_edits = 0;
    for edit in 1..=EDITS {
        let invalid = edit % 7 == 0;
        let rename = edit % 3 != 0;
        let (path, text) = if edit % 2 == 0 {
            if !invalid {
                chain = edit;
            }
            let text = if invalid {
                // A dangling connection: valid JSON, invalid chain.
                root_chain(edit).replace("\"toIndex\":2", "\"toIndex\":9")
            } else {
                root_chain(chain)
            };
            (&chain_file, text)
        } else {
            if !invalid {
                conv = edit;
            }
            let text = if invalid {
                "var data = decodeToJson(payload;\n".to_string()
            } else {
                converter(conv)
            };
            (&converter_file, text)
        };
        if invalid {
            invalid_edits += 1;
        }
        if rename {
            save_by_rename(path, &text);
        } else {
            std::fs::write(path, &text).unwrap();
        }
        // The previous valid version of an invalid file stays on disk only
        // until the next edit of that file, but the running set keeps it.
        if !invalid {
            allowed.insert((conv as i64, chain as i64));
        }
        tokio::time::sleep(Duration::from_millis(120)).await;
        if invalid {
            // Fix it again at once, as a user would.
            let fixed = if path == &chain_file {
                root_chain(chain)
            } else {
                converter(conv)
            };
            save_by_rename(path, &fixed);
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
    }
    producer.await.unwrap();

    // The final version is loaded and takes the records put from now on.
    let final_pair = (conv as i64, chain as i64);
    let stamp = format!("stamp {chain}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, chains) = service.get("/api/shardflow/ruleChains").await;
        let loaded = chains["chains"][0]["nodes"]
            .as_array()
            .is_some_and(|nodes| nodes.iter().any(|n| n["name"] == json!(stamp)));
        if loaded {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the final chain never loaded: {chains}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    put_many(&client, "reload", &records(RECORDS, RECORDS + 100)).await;

    let total = RECORDS + 100;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while stored(&service).len() < total {
        if std::time::Instant::now() > deadline {
            let metrics = service
                .http
                .get(format!("{}/metrics", service.base_url))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let log = service.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "{} of {total} records stored after 180 s, {} dead letters\n{}\nlog tail:\n{}",
                stored(&service).len(),
                service.count("dead_letters"),
                metrics
                    .lines()
                    .filter(|l| l.contains("in_flight")
                        || l.contains("records_")
                        || l.contains("version"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = stored(&service);
    assert_eq!(stored.len(), total, "records lost or stored twice");
    let mut seqs = HashSet::new();
    for ((_, ts), (seq, conv, chain)) in &stored {
        assert_eq!(*ts - BASE_TS, *seq, "a record's values are out of place");
        assert!(seqs.insert(*seq));
        assert!(
            allowed.contains(&(*conv, *chain)),
            "record {seq} was processed by converter {conv} with chain {chain}, which were never loaded together (allowed: {allowed:?})"
        );
        if *seq as usize >= RECORDS {
            assert_eq!(
                (*conv, *chain),
                final_pair,
                "record {seq} missed the final version"
            );
        }
    }

    // Invalid edits were reported, one ERROR line each time, and kept the
    // running version.
    let log = service.log();
    let rejected = log.matches("rule set reload rejected").count();
    assert!(
        rejected >= 1 && rejected <= 2 * invalid_edits,
        "{rejected} rejections for {invalid_edits} invalid edits"
    );
    assert!(
        log.contains("dangling") || log.contains("does not compile"),
        "{log}"
    );
    let reloads = log.matches("rule set reloaded").count();
    assert!(reloads >= 10, "only {reloads} reloads for {EDITS} edits");
    let (_, health) = service.get("/health").await;
    assert_eq!(health["rules"]["ok"], json!(true), "{health}");
    assert!(
        health["rules"]["version"].as_u64().unwrap() > 10,
        "{health}"
    );
    service.stop();
}
