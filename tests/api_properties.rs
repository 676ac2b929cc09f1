//! Property test of the API's request bodies and query strings against the
//! running service: arbitrary bytes and JSON never get a 5xx or take the
//! service down.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

fn body() -> impl Strategy<Value = Vec<u8>> {
    let json = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        "[ -~]{0,20}".prop_map(Value::from),
        prop::collection::btree_map("[a-zA-Z]{0,8}", any::<i64>().prop_map(Value::from), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        prop::collection::btree_map(
            prop_oneof![
                Just("username".to_string()),
                Just("password".to_string()),
                Just("refreshToken".to_string()),
                Just("ids".to_string()),
                Just("since".to_string())
            ],
            prop_oneof![
                Just(Value::Null),
                any::<i64>().prop_map(Value::from),
                "[ -~]{0,12}".prop_map(Value::from),
                prop::collection::vec(any::<i64>().prop_map(Value::from), 0..3)
                    .prop_map(Value::Array)
            ],
            0..4,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect())),
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        json.prop_map(|v| v.to_string().into_bytes()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_bodies_and_queries_get_no_server_error() {
    let emulator = Emulator::start();
    let client = emulator.client().await;
    create_stream(&client, "bodies", 1).await;
    let mut service = Service::start(&Setup::walkthrough("bodies"), &emulator).await;
    put(&client, "bodies", "123", WALKTHROUGH_RECORD.as_bytes()).await;
    let device = service.wait_device("kitchen_thermostat").await;
    let id = device["id"]["id"].as_str().unwrap().to_string();
    let token = service.login().await;
    let base = service.base_url.clone();
    let http = service.http.clone();

    let posts = [
        "/api/auth/login".to_string(),
        "/api/auth/token".to_string(),
        format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        format!("/api/plugins/telemetry/DEVICE/{id}/attributes/SERVER_SCOPE"),
        "/api/shardflow/deadLetters/replay".to_string(),
        "/api/shardflow/converters/test".to_string(),
    ];
    let gets = [
        "/api/tenant/devices".to_string(),
        format!("/api/plugins/telemetry/DEVICE/{id}/values/timeseries"),
        format!("/api/plugins/telemetry/DEVICE/{id}/values/attributes"),
        "/api/shardflow/deadLetters".to_string(),
        "/api/shardflow/events".to_string(),
        "/api/shardflow/integrations".to_string(),
    ];
    let cases: Vec<(usize, Vec<u8>, String)> = {
        let mut runner = TestRunner::new(Config::with_cases(300));
        let strategy = (0..posts.len() + gets.len(), body(), "[ -~]{0,40}");
        (0..300)
            .map(|_| strategy.new_tree(&mut runner).unwrap().current())
            .collect()
    };
    for (target, body, query) in cases {
        let response = if target < posts.len() {
            http.post(format!("{base}{}", posts[target]))
                .header("X-Authorization", format!("Bearer {token}"))
                .header("Content-Type", "application/json")
                .body(body.clone())
                .send()
                .await
        } else {
            let query: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
            let query = query.replace("%3D", "=").replace("%26", "&");
            http.get(format!("{base}{}?{query}", gets[target - posts.len()]))
                .header("X-Authorization", format!("Bearer {token}"))
                .send()
                .await
        }
        .expect("the service answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        assert!(
            status < 500,
            "{status} for target {target} with body {:?}: {text}",
            String::from_utf8_lossy(&body)
        );
    }
    let (status, health) = service.get("/health").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("UP")));
    service.stop();
}
