//! Messages from the API survive a crash: an attribute save whose
//! ATTRIBUTES_UPDATED is still on its way to the downlink when the process
//! is killed is handed to the chain again at the next start, and the
//! downlink goes out.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attribute_save_cut_off_by_a_crash_still_sends_its_downlink() {
    // A REST endpoint that holds the first request until the process
    // holding it is gone, and echoes the others at once (the node's
    // output is the answer's body).
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let app = axum::Router::new().route(
        "/hold",
        axum::routing::post(move |body: String| {
            let seen = seen.clone();
            async move {
                if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                    std::future::pending::<()>().await;
                }
                body
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let emulator = Emulator::start();
    let client = emulator.client().await;
    create_stream(&client, "outbox-up", 1).await;
    create_stream(&client, "tb-test-downlink", 1).await;
    let mut setup = Setup::walkthrough("outbox-up");
    // Attributes Updated -> REST call -> Integration Downlink.
    let mut root: serde_json::Value = serde_json::from_str(&setup.root_chain).unwrap();
    root["metadata"]["nodes"]
        .as_array_mut()
        .unwrap()
        .push(json!({
        "type": "org.thingsboard.rule.engine.rest.TbRestApiCallNode", "name": "hold",
        "configuration": {"restEndpointUrlPattern": format!("http://{address}/hold"),
                          "requestMethod": "POST", "readTimeoutMs": 600000}}));
    let connections = root["metadata"]["connections"].as_array_mut().unwrap();
    connections.retain(|c| c["type"] != "Attributes Updated");
    connections.push(json!({"fromIndex": 0, "toIndex": 6, "type": "Attributes Updated"}));
    connections.push(json!({"fromIndex": 6, "toIndex": 5, "type": "Success"}));
    setup.root_chain = root.to_string();

    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start_in(dir.path(), &setup, &emulator).await;
    put(&client, "outbox-up", "123", WALKTHROUGH_RECORD.as_bytes()).await;
    let device = service.wait_device("kitchen_thermostat").await;
    let id = device["id"]["id"].as_str().unwrap().to_string();
    let (status, _) = service
        .post(
            &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
            r#"{"version": "v.0.11"}"#,
        )
        .await;
    assert_eq!(status, 200);

    // The message is at the REST node: kill the process there.
    wait_for(
        "the message to reach the REST node",
        Duration::from_secs(30),
        || async { (calls.load(Ordering::SeqCst) >= 1).then_some(()) },
    )
    .await;
    service.kill();
    let pending: i64 = rusqlite::Connection::open(dir.path().join("data/shardflow.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(pending, 1);
    assert!(read_all(&client, "tb-test-downlink").await.is_empty());

    // The next start hands it to the chain again; the downlink goes out.
    let service = Service::start_in(dir.path(), &setup, &emulator).await;
    let records = wait_for("the downlink", Duration::from_secs(60), || async {
        let records = read_all(&client, "tb-test-downlink").await;
        (!records.is_empty()).then_some(records)
    })
    .await;
    assert_eq!(records.len(), 1);
    let data: serde_json::Value = serde_json::from_slice(records[0].data().as_ref()).unwrap();
    assert_eq!(
        data,
        json!({"devName": "kitchen_thermostat", "version": "v.0.11"})
    );
    assert_eq!(records[0].partition_key(), Some("123"));
    wait_for("the outbox to empty", Duration::from_secs(30), || async {
        (service.count("outbox") == 0).then_some(())
    })
    .await;
    assert!(service.log().contains("handed to the rule chain again"));
}
