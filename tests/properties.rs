//! Property tests: arbitrary input on the record path (payload bytes,
//! converter results), the chain loader and the API's request bodies. The
//! properties: no panic, a clear error for what is wrong, and, on the
//! record path, every record either stored or kept as a dead letter with
//! its bytes unchanged.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Value};
use shardflow::chain::loader::{self, UnknownNodes};
use shardflow::convert::js::{JsArg, JsLimits, JsRuntime};
use shardflow::kinesis::reader::ShardReader;

fn limits() -> JsLimits {
    JsLimits {
        call_timeout: Duration::from_millis(1000),
        memory_limit_bytes: 32 << 20,
        max_result_bytes: 1 << 20,
    }
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-zA-Z0-9 _.$]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let keys = prop_oneof![
            // Keys a converter result or a chain export has, and others.
            Just("deviceName".to_string()),
            Just("assetName".to_string()),
            Just("telemetry".to_string()),
            Just("attributes".to_string()),
            Just("ts".to_string()),
            Just("values".to_string()),
            Just("deviceType".to_string()),
            Just("metadata".to_string()),
            Just("nodes".to_string()),
            Just("connections".to_string()),
            Just("firstNodeIndex".to_string()),
            Just("type".to_string()),
            Just("configuration".to_string()),
            Just("fromIndex".to_string()),
            Just("toIndex".to_string()),
            "[a-z]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_converter_result_is_taken_or_refused_with_a_reason(value in json_value()) {
        match shardflow::convert::uplink::parse(value) {
            Ok(uplinks) => prop_assert!(uplinks.iter().all(|u| !u.name.is_empty())),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn the_chain_loader_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = loader::parse(&text, Path::new("fuzz.json"), UnknownNodes::Reject);
    }

    #[test]
    fn the_chain_loader_takes_any_json(value in json_value()) {
        let text = json!({"ruleChain": {"name": "p"}, "metadata": value}).to_string();
        if let Ok(def) = loader::parse(&text, Path::new("p.json"), UnknownNodes::Reject) {
            // A chain that loads can be started: acyclic, first node in range.
            prop_assert!(petgraph::algo::toposort(&def.graph, None).is_ok());
            prop_assert!(def.first.index() < def.graph.node_count());
        }
    }

    #[test]
    fn a_damaged_root_chain_never_panics_the_loader(
        path in prop::collection::vec(0usize..8, 1..4),
        replacement in json_value(),
    ) {
        let mut chain: Value = serde_json::from_str(&std::fs::read_to_string(
            common::repo().join("rulechains/root.json")).unwrap()).unwrap();
        damage(&mut chain, &path, replacement);
        let _ = loader::parse(&chain.to_string(), Path::new("root.json"), UnknownNodes::Reject);
    }
}

/// Replaces the value found by following `path` (child index at each
/// level, modulo the children there) with `replacement`.
fn damage(value: &mut Value, path: &[usize], replacement: Value) {
    let Some((&first, rest)) = path.split_first() else {
        *value = replacement;
        return;
    };
    let child = match value {
        Value::Object(map) if !map.is_empty() => {
            let key = map.keys().nth(first % map.len()).unwrap().clone();
            map.get_mut(&key)
        }
        Value::Array(items) if !items.is_empty() => {
            let len = items.len();
            items.get_mut(first % len)
        }
        _ => None,
    };
    match child {
        Some(child) => damage(child, rest, replacement),
        None => *value = replacement,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn converters_get_any_payload_as_a_real_array(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut runtime = JsRuntime::new(limits()).unwrap();
        runtime
            .compile("c", "p.js", "Decoder", "payload, metadata",
                "return {n: payload.length, array: Array.isArray(payload), sum: payload.reduce(function (a, b) { return a + b; }, 0), text: decodeToString(payload).length};")
            .unwrap();
        let record = shardflow::delivery::SourceRecord {
            payload: Bytes::from(bytes.clone()),
            ..Default::default()
        };
        let out = runtime
            .call("c", &[JsArg::Bytes(&bytes), JsArg::RecordMetadata(&record)])
            .unwrap();
        prop_assert_eq!(&out["n"], &json!(bytes.len()));
        prop_assert_eq!(&out["array"], &json!(true));
        prop_assert_eq!(&out["sum"], &json!(bytes.iter().map(|b| *b as u64).sum::<u64>()));
        prop_assert_eq!(&out["text"], &json!(bytes.len()));
    }
}

/// A payload: the walkthrough's JSON, JSON of another shape, or any bytes.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (0u32..50, -100i64..100).prop_map(|(d, t)| format!(
            r#"{{"devName": "dev-{d}", "devType": "thermostat", "temperature": {t}}}"#
        )
        .into_bytes()),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..300),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// The shipped converter and root chain over arbitrary records: every
    /// record is done, those that fail are dead letters with their exact
    /// bytes, and the checkpoint covers the last record.
    #[test]
    fn every_record_is_stored_or_kept_with_its_bytes(payloads in prop::collection::vec(payload(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let repo = common::repo();
        std::fs::create_dir_all(dir.path().join("rulechains")).unwrap();
        std::fs::copy(repo.join("rulechains/root.json"), dir.path().join("rulechains/root.json")).unwrap();
        let config_text = format!(
            r#"root_chain = "rulechains/root.json"
            [rules]
            watch = false
            [[integration]]
            name = "kinesis_integration"
            uplink_converter = "{}"
            downlink_converter = "{}"
            stream_name = "p"
            access_key_id = "test"
            secret_access_key = "test"
            initial_position = "TRIM_HORIZON"
            endpoint_url = "http://127.0.0.1:9"
            "#,
            repo.join("converters/kinesis_converter.js").display(),
            repo.join("converters/kinesis_downlink_version.js").display(),
        );
        std::fs::write(dir.path().join("shardflow.toml"), config_text).unwrap();
        let config = shardflow::config::Config::load(&dir.path().join("shardflow.toml")).unwrap();
        let source = shardflow::service::preflight(&config).unwrap();
        let store = shardflow::store::Store::open(&config.data_dir).unwrap();
        let io = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let total = payloads.len();
        let reader = Arc::new(common::standin::PayloadReader::new(payloads.clone()));
        let handle = io.handle().clone();
        let checked = store.clone();
        actix::System::new().block_on(async move {
            let factory = move |_: &shardflow::config::IntegrationConfig, _: &aws_sdk_kinesis::Client| {
                reader.clone() as Arc<dyn ShardReader>
            };
            let pipeline = shardflow::service::Pipeline::start(&config, source, store, handle, &factory)
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while pipeline.status.records_done.load(Ordering::Relaxed) < total as u64 {
                assert!(Instant::now() < deadline, "records were not all done");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            pipeline.stop().await.unwrap();
        });

        let letters = checked
            .dead_letters(&shardflow::store::DeadLetterFilter { limit: 1000, ..Default::default() })
            .unwrap();
        let kept: BTreeMap<String, Vec<u8>> = letters
            .into_iter()
            .map(|l| (l.sequence_number, l.payload))
            .collect();
        for (n, payload) in payloads.iter().enumerate() {
            let device = serde_json::from_slice::<Value>(payload)
                .ok()
                .and_then(|v| v.get("devName")?.as_str().map(str::to_string));
            match device {
                // The walkthrough's shape: stored, at the record's arrival time.
                Some(name) => {
                    let entity = checked
                        .entity_by_name(shardflow::msg::EntityType::Device, &name)
                        .expect("the device exists");
                    let ts = 1_700_000_000_000 + n as i64;
                    let history = checked.history(entity.id, "temperature", ts, ts, 1).unwrap();
                    prop_assert_eq!(history.len(), 1, "record {} was not stored", n + 1);
                    prop_assert!(!kept.contains_key(&(n + 1).to_string()));
                }
                // Anything else: a dead letter with the record's own bytes.
                None => {
                    let bytes = kept.get(&(n + 1).to_string());
                    prop_assert_eq!(bytes, Some(payload), "record {} was lost or changed", n + 1);
                }
            }
        }
        let checkpoint = checked
            .checkpoint("shardflow-kinesis_integration", "p", "shardId-000000000000")
            .unwrap()
            .and_then(|c| c.sequence_number);
        prop_assert_eq!(checkpoint, Some(total.to_string()));
        drop(io);
    }
}
