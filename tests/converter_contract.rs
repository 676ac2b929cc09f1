//! The uplink converter contract, as ThingsBoard defines it: one or many
//! devices, telemetry flat or with ts, value kinds, attributes, assets, and
//! a result without deviceName.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// Each record is the converter output it should produce.
const ECHO_CONVERTER: &str = "return decodeToJson(payload);";

async fn start(stream: &str) -> (Emulator, aws_sdk_kinesis::Client, Service) {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, stream, 1).await;
    let mut setup = Setup::walkthrough(stream);
    setup.uplink_converter = ECHO_CONVERTER.into();
    let service = Service::start(&setup, &emulator).await;
    (emulator, kinesis, service)
}

async fn device_id(service: &mut Service, name: &str) -> String {
    service.wait_device(name).await["id"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converter_results_are_stored_as_thingsboard_does() {
    let (_emulator, kinesis, mut service) = start("contract").await;
    let outputs = [
        json!({"deviceName": "ts-values", "telemetry": {"ts": 1_600_000_000_000i64, "values": {"t": 1}}}),
        json!([
            {"deviceName": "many-1", "deviceType": "a", "telemetry": {"t": 10}},
            {"deviceName": "many-2", "deviceType": "b", "telemetry": [{"ts": 5, "values": {"t": 20}}, {"ts": 6, "values": {"t": 21}}]}
        ]),
        json!({"deviceName": "kinds", "telemetry": {"on": true, "name": "north", "ratio": 0.5, "obj": {"a": 1, "b": [1, 2]}},
               "attributes": {"fw": "1.2", "slots": 3}}),
        json!({"assetName": "building-7", "assetType": "building", "telemetry": {"floors": 7}}),
        json!({"telemetry": {"t": 1}}),
        json!({"deviceName": "after", "telemetry": {"t": 1}}),
    ];
    for output in &outputs {
        put(&kinesis, "contract", "k", output.to_string().as_bytes()).await;
    }
    let records = read_all(&kinesis, "contract").await;

    // {ts, values}: stored under that ts.
    let id = device_id(&mut service, "ts-values").await;
    let latest = service.wait_latest(&id, "t").await;
    assert_eq!(latest["t"][0]["ts"], json!(1_600_000_000_000i64));
    assert_eq!(
        service.get(&format!("/api/device/{id}")).await.1["type"],
        "default"
    );

    // An array of devices, each with its own type; ts arrays keep each point.
    let many_2 = device_id(&mut service, "many-2").await;
    service.wait_latest(&many_2, "t").await;
    assert_eq!(service.wait_device("many-1").await["type"], "a");
    assert_eq!(service.wait_device("many-2").await["type"], "b");
    let (_, history) = service
        .get(&format!("/api/plugins/telemetry/DEVICE/{many_2}/values/timeseries?keys=t&startTs=0&endTs=10&useStrictDataTypes=true"))
        .await;
    assert_eq!(
        history["t"],
        json!([{"ts": 6, "value": 21}, {"ts": 5, "value": 20}])
    );

    // Flat telemetry without ts takes the record's arrival time.
    let many_1 = device_id(&mut service, "many-1").await;
    service.wait_latest(&many_1, "t").await;
    let arrival = records[1]
        .approximate_arrival_timestamp()
        .unwrap()
        .to_millis()
        .unwrap();
    assert_eq!(
        service.latest(&many_1, true).await["t"][0]["ts"],
        json!(arrival)
    );

    // Value kinds: boolean, string, double, JSON.
    let kinds = device_id(&mut service, "kinds").await;
    let latest = service.wait_latest(&kinds, "obj").await;
    assert_eq!(latest["on"][0]["value"], json!(true));
    assert_eq!(latest["name"][0]["value"], json!("north"));
    assert_eq!(latest["ratio"][0]["value"], json!(0.5));
    assert_eq!(latest["obj"][0]["value"], json!({"a": 1, "b": [1, 2]}));
    let stored_kind: i64 = service
        .db()
        .query_row("SELECT kind FROM ts_kv_latest WHERE key = 'obj'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(stored_kind, 4, "JSON kind");
    // Attributes from a device go to CLIENT_SCOPE (root chain).
    let attributes = wait_for("client attributes", Duration::from_secs(30), || {
        let http = service.http.clone();
        let url = format!(
            "{}/api/plugins/telemetry/DEVICE/{kinds}/values/attributes/CLIENT_SCOPE",
            service.base_url
        );
        let token = service.token_for_tests();
        async move {
            let body: serde_json::Value = http
                .get(url)
                .header("X-Authorization", format!("Bearer {token}"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (body.as_array()?.len() == 2).then_some(body)
        }
    })
    .await;
    assert_eq!(attributes[0]["key"], "fw");
    assert_eq!(attributes[1]["value"], json!(3));

    // assetName creates an asset.
    let (status, asset) = service.get("/api/tenant/assets?assetName=building-7").await;
    assert_eq!(status, 200);
    assert_eq!(asset["id"]["entityType"], "ASSET");
    assert_eq!(asset["type"], "building");

    // No deviceName: an error, nothing stored, the next record goes on.
    let after = device_id(&mut service, "after").await;
    service.wait_latest(&after, "t").await;
    let error: String = service
        .db()
        .query_row("SELECT error FROM dead_letters", [], |r| r.get(0))
        .unwrap();
    assert!(error.contains("deviceName"), "{error}");
    let devices = service
        .get("/api/tenant/devices?pageSize=100&page=0")
        .await
        .1;
    assert_eq!(devices["totalElements"], json!(5), "{devices}");
}
