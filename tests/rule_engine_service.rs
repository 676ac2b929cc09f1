//! The rule engine as a user meets it through the binary: `check` reports
//! every problem across the chain files at once; a running service shows
//! its chains, per-node counts and debug events through the API, the
//! metrics and `shardflow events`.

mod common;

use common::*;
use serde_json::json;

fn node(kind: &str, name: &str, config: serde_json::Value) -> serde_json::Value {
    json!({"type": format!("org.thingsboard.rule.engine.{kind}"), "name": name, "configuration": config})
}

#[test]
fn check_lists_every_problem_of_every_chain_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::walkthrough("s");
    let mut root: serde_json::Value = serde_json::from_str(&setup.root_chain).unwrap();
    let nodes = root["metadata"]["nodes"].as_array_mut().unwrap();
    nodes.push(node(
        "flow.TbRuleChainInputNode",
        "to nowhere",
        json!({"ruleChainId": "nowhere"}),
    ));
    nodes.push(node(
        "flow.TbRuleChainInputNode",
        "to helper",
        json!({"ruleChainId": "helper"}),
    ));
    let connections = root["metadata"]["connections"].as_array_mut().unwrap();
    connections.push(json!({"fromIndex": 0, "toIndex": 6, "type": "Entity Created"}));
    connections.push(json!({"fromIndex": 0, "toIndex": 7, "type": "Attributes Deleted"}));
    connections.push(json!({"fromIndex": 7, "toIndex": 1, "type": "No Such Output"}));
    setup.root_chain = root.to_string();
    write_config(dir.path(), &setup, "http://127.0.0.1:1", free_port());
    let helper = json!({"ruleChain": {"name": "Helper"}, "metadata": {"firstNodeIndex": 0,
        "nodes": [node("flow.TbRuleChainOutputNode", "Done", json!({})),
                  node("transform.TbTransformMsgNode", "bad script", json!({"jsScript": "return {"}))],
        "connections": [{"fromIndex": 1, "toIndex": 0, "type": "Success"}]}});
    std::fs::write(
        dir.path().join("rulechains/helper.json"),
        helper.to_string(),
    )
    .unwrap();
    let looping = json!({"ruleChain": {"name": "Loop"}, "metadata": {"firstNodeIndex": 0,
        "nodes": [node("action.TbLogNode", "again", json!({}))],
        "connections": [{"fromIndex": 0, "toIndex": 0, "type": "Success"}]}});
    std::fs::write(dir.path().join("rulechains/loop.json"), looping.to_string()).unwrap();
    std::fs::write(dir.path().join("rulechains/notes.json"), "[1, 2").unwrap();

    let (code, text) = run_binary(&["check"], &dir.path().join("shardflow.toml"));
    assert_eq!(code, Some(1), "{text}");
    for expected in [
        "names no chain",                   // root: a reference to a missing chain
        "\"No Such Output\"",               // root: a relation the called chain never emits
        "helper.json: node \"bad script\"", // helper: a script that does not compile
        "does not compile",
        "loop.json: node \"again\"", // loop: a self-loop
        "connects the node to itself",
        "notes.json", // a file that is no chain
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_counts_and_debug_events_are_visible() {
    let emulator = Emulator::start();
    let client = emulator.client().await;
    create_stream(&client, "visible", 1).await;
    create_stream(&client, "tb-test-downlink", 1).await;
    let mut setup = Setup::walkthrough("visible");
    let mut root: serde_json::Value = serde_json::from_str(&setup.root_chain).unwrap();
    root["metadata"]["nodes"][0]["debugMode"] = json!(true);
    setup.root_chain = root.to_string();
    let mut service = Service::start(&setup, &emulator).await;
    put(&client, "visible", "123", WALKTHROUGH_RECORD.as_bytes()).await;
    let device = service.wait_device("kitchen_thermostat").await;
    service
        .wait_latest(device["id"]["id"].as_str().unwrap(), "temperature")
        .await;

    let (status, chains) = service.get("/api/shardflow/ruleChains").await;
    assert_eq!(status, 200);
    assert_eq!(chains["reload"]["ok"], json!(true));
    let root = &chains["chains"][0];
    assert_eq!(root["root"], json!(true));
    assert_eq!(root["name"], json!("Root Rule Chain"));
    let switch = &root["nodes"][0];
    assert_eq!(switch["layout"], json!({"x": 320.0, "y": 150.0}));
    assert_eq!(switch["debugMode"], json!(true));
    // ENTITY_CREATED and POST_TELEMETRY_REQUEST went through the switch.
    assert_eq!(switch["stats"]["in"], json!(2), "{switch}");
    assert_eq!(
        switch["stats"]["out"]["Post telemetry"],
        json!(1),
        "{switch}"
    );
    assert_eq!(root["connections"].as_array().unwrap().len(), 5);

    let (_, health) = service.get("/health").await;
    assert_eq!(health["rules"]["version"], json!(1), "{health}");

    let (status, events) = service.get("/api/shardflow/events?limit=10").await;
    assert_eq!(status, 200);
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(events
        .iter()
        .any(|e| e["direction"] == "OUT" && e["relation"] == "Post telemetry"));
    assert!(events[0]["node"]
        .as_str()
        .unwrap()
        .contains("Message Type Switch"));

    let id = device["id"]["id"].as_str().unwrap().to_string();
    let (status, _) = service
        .post(
            &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
            r#"{"version": "v.0.11"}"#,
        )
        .await;
    assert_eq!(status, 200);
    let metrics_url = format!("{}/metrics", service.base_url);
    let http = service.http.clone();
    let metrics = wait_for(
        "the downlink to be counted",
        std::time::Duration::from_secs(30),
        || async {
            let text = http
                .get(&metrics_url)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("shardflow_downlinks_sent_total 1")
                .then_some(text)
        },
    )
    .await;
    for expected in [
        "shardflow_records_converted_total{integration=\"kinesis_integration\",shard=\"shardId-000000000000\"} 1",
        "shardflow_checkpoint_age_seconds{integration=\"kinesis_integration\"",
        "shardflow_downlinks_failed_total 0",
        "shardflow_js_call_duration_seconds_bucket{le=\"+Inf\"}",
        "shardflow_store_commit_duration_seconds_count",
    ] {
        assert!(metrics.contains(expected), "no {expected} in\n{metrics}");
    }
    let js_calls = metrics
        .lines()
        .find(|l| l.starts_with("shardflow_js_call_duration_seconds_count"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap();
    // The converter, the downlink converter, and no more than the log nodes.
    assert!(js_calls >= 2, "{js_calls}");
    assert!(
        metrics.contains(
            "shardflow_rule_node_relation_total{chain=\"Root Rule Chain\",node=\"Message Type Switch\",relation=\"Post telemetry\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("shardflow_rule_set_version 1"),
        "{metrics}"
    );

    let (code, text) = run_binary(
        &["events", "--limit", "2"],
        &service.dir.join("shardflow.toml"),
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("Message Type Switch") && text.contains("OUT"),
        "{text}"
    );
    service.stop();
}
