//! The user walkthrough, end to end: the seed record through the shipped
//! converter and root chain, the device in the API, and the downlink after
//! a shared attribute is saved.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walkthrough_uplink_then_shared_attribute_downlink() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "tb-test-uplink", 1).await;
    create_stream(&kinesis, "tb-test-downlink", 1).await;

    // The walkthrough's default: LATEST. Ready means every shard has its
    // iterator, so a record put now is read.
    let mut setup = Setup::walkthrough("tb-test-uplink");
    setup.initial_position = "LATEST";
    let mut service = Service::start(&setup, &emulator).await;
    put(
        &kinesis,
        "tb-test-uplink",
        "123",
        WALKTHROUGH_RECORD.as_bytes(),
    )
    .await;

    let device = service.wait_device("kitchen_thermostat").await;
    assert_eq!(device["name"], "kitchen_thermostat");
    assert_eq!(device["type"], "thermostat");
    assert_eq!(device["id"]["entityType"], "DEVICE");
    let id = device["id"]["id"].as_str().unwrap().to_string();

    let latest = wait_for("temperature", Duration::from_secs(30), || {
        let http = service.http.clone();
        let url = format!("{}/api/plugins/telemetry/DEVICE/{id}/values/timeseries?keys=temperature&useStrictDataTypes=true", service.base_url);
        let token = futures_token(&service);
        async move {
            let body: serde_json::Value = http
                .get(url)
                .header("X-Authorization", format!("Bearer {token}"))
                .send().await.ok()?.json().await.ok()?;
            body.get("temperature").cloned()
        }
    })
    .await;
    // Stored as a long, as ThingsBoard stores it.
    assert_eq!(latest[0]["value"], json!(22));
    let text = service.latest(&id, false).await;
    assert_eq!(text["temperature"][0]["value"], json!("22"));

    // The record shows in the metrics.
    let metrics = service
        .http
        .get(format!("{}/metrics", service.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("shardflow_records_done_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("shardflow_store_writable 1"), "{metrics}");
    assert!(metrics.contains("shardflow_records_read_total{integration=\"kinesis_integration\",shard=\"shardId-000000000000\"} 1"), "{metrics}");

    // Save the shared attribute: ATTRIBUTES_UPDATED -> Integration Downlink.
    let (status, _) = service
        .post(
            &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
            r#"{"version":"v.0.11"}"#,
        )
        .await;
    assert_eq!(status, 200);
    let (_, attributes) = service
        .get(&format!(
            "/api/plugins/telemetry/DEVICE/{id}/values/attributes/SHARED_SCOPE"
        ))
        .await;
    assert_eq!(attributes[0]["key"], "version");
    assert_eq!(attributes[0]["value"], "v.0.11");

    wait_for("the downlink record", Duration::from_secs(30), || {
        let kinesis = kinesis.clone();
        async move {
            let records = read_all(&kinesis, "tb-test-downlink").await;
            (!records.is_empty()).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = read_all(&kinesis, "tb-test-downlink").await;
    assert_eq!(records.len(), 1, "exactly one downlink record");
    assert_eq!(
        std::str::from_utf8(records[0].data().as_ref()).unwrap(),
        r#"{"devName":"kitchen_thermostat","version":"v.0.11"}"#
    );
    assert_eq!(records[0].partition_key(), Some("123"));

    // A client attribute cannot be saved through the API.
    let (status, body) = service
        .post(
            &format!("/api/plugins/telemetry/{id}/CLIENT_SCOPE"),
            r#"{"x":1}"#,
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

fn futures_token(service: &Service) -> String {
    service.token_for_tests()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_data_directory_refuses_to_start() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "tb-test-uplink", 1).await;
    let setup = Setup::walkthrough("tb-test-uplink");
    let first = Service::start(&setup, &emulator).await;

    let config = write_config(&first.dir, &setup, &emulator.endpoint, free_port());
    let output = std::process::Command::new(binary())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another shardflow instance"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_a_token_but_probes_do_not() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "tb-test-uplink", 1).await;
    let service = Service::start(&Setup::walkthrough("tb-test-uplink"), &emulator).await;
    let http = reqwest::Client::new();

    let status = |path: &str| {
        let http = http.clone();
        let url = format!("{}{path}", service.base_url);
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/api/tenant/devices?deviceName=x").await, 401);
    assert_eq!(status("/health").await, 200);
    assert_eq!(status("/ready").await, 200);
    assert_eq!(status("/metrics").await, 200);

    let wrong = http
        .post(format!("{}/api/auth/login", service.base_url))
        .json(&json!({"username": "tenant@thingsboard.org", "password": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);

    // Guessing is rate-limited: after ten failures a minute, even the right
    // password is refused for a while.
    let login = |password: &'static str| {
        let http = http.clone();
        let url = format!("{}/api/auth/login", service.base_url);
        async move {
            http.post(url)
                .json(&json!({"username": "tenant@thingsboard.org", "password": password}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for _ in 0..9 {
        assert_eq!(login("nope").await, 401);
    }
    assert_eq!(login("tenant").await, 429);
}
