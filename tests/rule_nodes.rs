//! The rule node types, each driven through real chains: the node actors,
//! the QuickJS pool and a SQLite store, messages in, stored state and dead
//! letters out.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::engine::{chain, message, Engine, SAVE_ATTRIBUTES, SAVE_TIMESERIES};
use serde_json::{json, Value};
use shardflow::msg::EntityId;
use shardflow::store::Scope;

fn save() -> (&'static str, &'static str, Value) {
    (SAVE_TIMESERIES, "save", json!({"defaultTTL": 0}))
}

fn js(kind: &'static str, name: &'static str, script: &str) -> (&'static str, &'static str, Value) {
    (kind, name, json!({"scriptLang": "JS", "jsScript": script}))
}

#[actix_rt::test]
async fn script_filter_routes_true_and_false() {
    let root = chain(
        "filter",
        &[
            js(
                "filter.TbJsFilterNode",
                "hot",
                "return msg.temperature > 25;",
            ),
            (
                SAVE_ATTRIBUTES,
                "hot attr",
                json!({"scope": "SERVER_SCOPE"}),
            ),
            save(),
            js(
                "transform.TbTransformMsgNode",
                "as attributes",
                "return {msg: {hot: true}, msgType: 'POST_ATTRIBUTES_REQUEST'};",
            ),
        ],
        &[(0, 3, "True"), (3, 1, "Success"), (0, 2, "False")],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let cold = engine.device("cold");
    let hot = engine.device("hot");
    assert!(engine.telemetry(&cold, json!({"temperature": 20})).await);
    assert!(engine.telemetry(&hot, json!({"temperature": 30})).await);
    assert_eq!(engine.latest(cold.id)["temperature"], json!(20));
    assert!(engine.latest(hot.id).is_empty());
    assert_eq!(engine.attributes(hot.id, Scope::Server)["hot"], json!(true));
}

#[actix_rt::test]
async fn a_filter_returning_no_boolean_fails_with_the_reason() {
    let root = chain(
        "filter",
        &[js("filter.TbJsFilterNode", "broken", "return 'yes';")],
        &[],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let device = engine.device("d");
    assert!(engine.telemetry(&device, json!({"t": 1})).await);
    let errors = engine.dead_letter_errors();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("must return true or false"),
        "{errors:?}"
    );
}

#[actix_rt::test]
async fn script_switch_sends_a_copy_along_each_relation() {
    let root = chain(
        "switch",
        &[
            js(
                "filter.TbJsSwitchNode",
                "route",
                "return msg.kind === 'both' ? ['A', 'B'] : 'A';",
            ),
            js(
                "transform.TbTransformMsgNode",
                "mark a",
                "msg.a = 1; return {msg: msg};",
            ),
            js(
                "transform.TbTransformMsgNode",
                "mark b",
                "return {msg: {b: 1}, metadata: metadata};",
            ),
            save(),
        ],
        &[
            (0, 1, "A"),
            (0, 2, "B"),
            (1, 3, "Success"),
            (2, 3, "Success"),
        ],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let device = engine.device("d");
    assert!(engine.telemetry(&device, json!({"kind": "both"})).await);
    let latest = engine.latest(device.id);
    assert_eq!(latest["a"], json!(1));
    assert_eq!(latest["b"], json!(1));
}

#[actix_rt::test]
async fn a_transform_may_return_several_messages() {
    let root = chain(
        "split",
        &[
            js(
                "transform.TbTransformMsgNode",
                "split",
                "return msg.readings.map(function (r) { return {msg: {ts: r.ts, values: {v: r.v}}}; });",
            ),
            save(),
        ],
        &[(0, 1, "Success")],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let device = engine.device("d");
    let data = json!({"readings": [{"ts": 1000, "v": 1}, {"ts": 2000, "v": 2}]});
    assert!(engine.telemetry(&device, data).await);
    let history = engine.store.history(device.id, "v", 0, 10_000, 10).unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(engine.latest(device.id)["v"], json!(2));
}

#[actix_rt::test]
async fn a_throwing_script_goes_to_failure_with_the_error_in_metadata() {
    let root = chain(
        "throws",
        &[
            js(
                "transform.TbTransformMsgNode",
                "boom",
                "throw new Error('no way');",
            ),
            js(
                "transform.TbTransformMsgNode",
                "keep error",
                "return {msg: {error: metadata.error}, msgType: 'POST_ATTRIBUTES_REQUEST'};",
            ),
            (
                SAVE_ATTRIBUTES,
                "save error",
                json!({"scope": "SERVER_SCOPE"}),
            ),
        ],
        &[(0, 1, "Failure"), (1, 2, "Success")],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let device = engine.device("d");
    assert!(engine.telemetry(&device, json!({"t": 1})).await);
    let error = engine.attributes(device.id, Scope::Server)["error"].clone();
    assert!(error.as_str().unwrap().contains("no way"), "{error}");
    assert!(engine.dead_letter_errors().is_empty());
}

#[actix_rt::test]
async fn tbel_scripts_run_where_they_parse_as_javascript() {
    let filter = (
        "filter.TbJsFilterNode",
        "tbel filter",
        json!({"scriptLang": "TBEL", "tbelScript": "return msg.t > 1;"}),
    );
    let root = chain("tbel", &[filter, save()], &[(0, 1, "True")]);
    let engine = Engine::start(&[("root.json", root)]);
    let device = engine.device("d");
    assert!(engine.telemetry(&device, json!({"t": 2})).await);
    assert_eq!(engine.latest(device.id)["t"], json!(2));

    // TBEL that is not JavaScript is rejected at load, naming the node.
    let dir = tempfile::tempdir().unwrap();
    let bad = chain(
        "tbel",
        &[(
            "filter.TbJsFilterNode",
            "tbel only",
            json!({"scriptLang": "TBEL", "tbelScript": "def twice(x) { x * 2 }\nreturn twice(msg.t) > 2;"}),
        )],
        &[],
    );
    std::fs::write(dir.path().join("root.json"), bad).unwrap();
    let config = shardflow::chain::set::SetConfig {
        root_chain: dir.path().join("root.json"),
        unknown_nodes: Default::default(),
        limits: shardflow::service::js_limits_default(),
        converters: Vec::new(),
    };
    let problems = shardflow::chain::set::load(&config, None).err().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("tbel only") && problems[0].contains("TBEL script is not JavaScript"),
        "{problems:?}"
    );
}

#[actix_rt::test]
async fn check_message_rename_copy_and_delete_keys() {
    let root = chain(
        "keys",
        &[
            (
                "filter.TbCheckMessageNode",
                "has temp",
                json!({"messageNames": ["temp"], "metadataNames": ["deviceName"], "checkAllKeys": true}),
            ),
            (
                "transform.TbRenameKeysNode",
                "rename",
                json!({"renameIn": "DATA", "renameKeysMapping": {"temp": "temperature"}}),
            ),
            (
                "transform.TbCopyKeysNode",
                "copy",
                json!({"copyFrom": "METADATA", "keys": ["device.*"]}),
            ),
            (
                "transform.TbDeleteKeysNode",
                "delete",
                json!({"deleteFrom": "DATA", "keys": ["secret"]}),
            ),
            save(),
        ],
        &[
            (0, 1, "True"),
            (1, 2, "Success"),
            (2, 3, "Success"),
            (3, 4, "Success"),
        ],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let device = engine.device("kitchen");
    assert!(
        engine
            .telemetry(&device, json!({"temp": 21, "secret": "x"}))
            .await
    );
    let latest = engine.latest(device.id);
    assert_eq!(latest["temperature"], json!(21));
    assert_eq!(latest["deviceName"], json!("kitchen"));
    assert_eq!(latest["deviceType"], json!("thermostat"));
    assert!(
        !latest.contains_key("temp") && !latest.contains_key("secret"),
        "{latest:?}"
    );

    // No `temp`: False, which goes nowhere.
    let other = engine.device("other");
    assert!(engine.telemetry(&other, json!({"humidity": 50})).await);
    assert!(engine.latest(other.id).is_empty());
}

#[actix_rt::test]
async fn originator_type_switch_and_change_originator() {
    let root = chain(
        "originators",
        &[
            ("filter.TbOriginatorTypeSwitchNode", "type", json!({})),
            (
                "transform.TbChangeOriginatorNode",
                "to gateway",
                json!({"originatorSource": "ENTITY", "entityType": "DEVICE",
                       "entityNamePattern": "${deviceName}-gw"}),
            ),
            save(),
        ],
        &[(0, 1, "Device"), (1, 2, "Success")],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let sensor = engine.device("sensor");
    let gateway = engine.device("sensor-gw");
    assert!(engine.telemetry(&sensor, json!({"t": 5})).await);
    assert_eq!(engine.latest(gateway.id)["t"], json!(5));
    assert!(engine.latest(sensor.id).is_empty());

    // No entity of that name: Failure, kept as a dead letter.
    let lonely = engine.device("lonely");
    assert!(engine.telemetry(&lonely, json!({"t": 5})).await);
    let errors = engine.dead_letter_errors();
    assert!(
        errors.iter().any(|e| e.contains("\"lonely-gw\"")),
        "{errors:?}"
    );
}

#[actix_rt::test]
async fn originator_attributes_enrich_metadata_or_data() {
    let fetch = |fetch_to: &str| {
        (
            "metadata.TbGetAttributesNode",
            "fetch",
            json!({"serverAttributeNames": ["threshold"], "latestTsKeyNames": ["temperature"],
                   "fetchTo": fetch_to, "tellFailureIfAbsent": true}),
        )
    };
    let to_data = chain("to data", &[fetch("DATA"), save()], &[(0, 1, "Success")]);
    let engine = Engine::start(&[("root.json", to_data)]);
    let device = engine.device("d");
    engine
        .store
        .write(
            vec![shardflow::store::Write::Attributes {
                entity: device.id,
                scope: Scope::Server,
                ts: 1,
                values: vec![("threshold".into(), shardflow::store::KvValue::Long(30))],
            }],
            None,
        )
        .await
        .unwrap();
    assert!(engine.telemetry(&device, json!({"temperature": 20})).await);
    // The first message found no telemetry yet: Failure, a dead letter.
    assert_eq!(engine.dead_letter_errors().len(), 1);

    let seed_latest = shardflow::store::Write::Telemetry {
        entity: device.id,
        ts: 5,
        values: vec![("temperature".into(), shardflow::store::KvValue::Long(19))],
        expires_ms: None,
        latest: true,
    };
    engine.store.write(vec![seed_latest], None).await.unwrap();
    assert!(engine.telemetry(&device, json!({"humidity": 40})).await);
    let latest = engine.latest(device.id);
    assert_eq!(latest["ss_threshold"], json!(30));
    assert_eq!(latest["humidity"], json!(40));

    // Into metadata: a transform makes the metadata visible.
    let to_metadata = chain(
        "to metadata",
        &[
            fetch("METADATA"),
            js(
                "transform.TbTransformMsgNode",
                "show",
                "return {msg: {seen: metadata.ss_threshold + '/' + metadata.temperature}};",
            ),
            save(),
        ],
        &[(0, 1, "Success"), (1, 2, "Success")],
    );
    let engine2 = Engine::start(&[("root.json", to_metadata)]);
    let other = engine2.device("o");
    engine2
        .store
        .write(
            vec![
                shardflow::store::Write::Attributes {
                    entity: other.id,
                    scope: Scope::Server,
                    ts: 1,
                    values: vec![("threshold".into(), shardflow::store::KvValue::Long(7))],
                },
                shardflow::store::Write::Telemetry {
                    entity: other.id,
                    ts: 5,
                    values: vec![("temperature".into(), shardflow::store::KvValue::Double(1.5))],
                    expires_ms: None,
                    latest: true,
                },
            ],
            None,
        )
        .await
        .unwrap();
    assert!(engine2.telemetry(&other, json!({"x": 1})).await);
    assert_eq!(engine2.latest(other.id)["seen"], json!("7/1.5"));
}

#[actix_rt::test]
async fn delete_attributes_with_a_notification_into_the_root_chain() {
    let root = chain(
        "delete",
        &[
            ("filter.TbMsgTypeSwitchNode", "switch", json!({})),
            (
                "telemetry.TbMsgDeleteAttributesNode",
                "delete",
                json!({"scope": "SHARED_SCOPE", "keys": ["version", "${extra}"],
                       "sendAttributesDeletedNotification": true}),
            ),
            js(
                "transform.TbTransformMsgNode",
                "record deletion",
                "return {msg: {deleted: msg.attributes.join(','), scope: metadata.scope}, msgType: 'POST_ATTRIBUTES_REQUEST'};",
            ),
            (SAVE_ATTRIBUTES, "save", json!({"scope": "SERVER_SCOPE"})),
        ],
        &[
            (0, 1, "Post telemetry"),
            (0, 2, "Attributes Deleted"),
            (2, 3, "Success"),
        ],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let device = engine.device("d");
    engine
        .store
        .write(
            vec![shardflow::store::Write::Attributes {
                entity: device.id,
                scope: Scope::Shared,
                ts: 1,
                values: vec![
                    (
                        "version".into(),
                        shardflow::store::KvValue::Str("v1".into()),
                    ),
                    ("color".into(), shardflow::store::KvValue::Str("red".into())),
                    ("keep".into(), shardflow::store::KvValue::Bool(true)),
                ],
            }],
            None,
        )
        .await
        .unwrap();
    let mut msg = message(&device, "POST_TELEMETRY_REQUEST", json!({"t": 1}));
    msg.metadata.insert("extra".into(), "color".into());
    assert!(engine.send(msg).await);
    let shared = engine.attributes(device.id, Scope::Shared);
    assert_eq!(shared.keys().collect::<Vec<_>>(), vec!["keep"]);
    let server = engine.attributes(device.id, Scope::Server);
    assert_eq!(server["deleted"], json!("version,color"));
    assert_eq!(server["scope"], json!("SHARED_SCOPE"));
}

#[actix_rt::test]
async fn message_count_reports_counts_as_tenant_telemetry() {
    let root = chain(
        "count",
        &[
            (
                "action.TbMsgCountNode",
                "count",
                json!({"interval": 1, "telemetryPrefix": "messageCount"}),
            ),
            save(),
        ],
        &[(0, 1, "Success")],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let device = engine.device("d");
    for i in 0..5 {
        assert!(engine.telemetry(&device, json!({"i": i})).await);
    }
    let tenant = EntityId::tenant();
    let counted = common::wait_for("a message count", Duration::from_secs(10), || async {
        let history = engine
            .store
            .history(tenant, "messageCount_shardflow", 0, i64::MAX, 100)
            .unwrap();
        let total: i64 = history
            .iter()
            .map(|v| v.value.to_json().as_i64().unwrap())
            .sum();
        (total == 5).then_some(total)
    })
    .await;
    assert_eq!(counted, 5);
}

#[actix_rt::test]
async fn a_generator_makes_messages_from_its_previous_one() {
    let root = chain(
        "generator",
        &[
            (
                "debug.TbMsgGeneratorNode",
                "gen",
                json!({"msgCount": 3, "periodInSeconds": 1, "scriptLang": "JS",
                       "jsScript": "var n = (prevMsg.n || 0) + 1; return {msg: {n: n}, metadata: {}, msgType: 'POST_TELEMETRY_REQUEST'};"}),
            ),
            save(),
        ],
        &[(0, 1, "Success")],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let tenant = EntityId::tenant();
    common::wait_for(
        "three generated messages",
        Duration::from_secs(15),
        || async {
            let latest = engine.latest(tenant);
            (latest.get("n") == Some(&json!(3))).then_some(())
        },
    )
    .await;
    // msgCount is a limit: no fourth.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let history = engine.store.history(tenant, "n", 0, i64::MAX, 10).unwrap();
    assert_eq!(history.len(), 3, "{history:?}");
}

#[actix_rt::test]
async fn a_rule_chain_node_calls_another_chain_and_gets_its_output_back() {
    let helper = chain(
        "Helper",
        &[
            js(
                "transform.TbTransformMsgNode",
                "double",
                "msg.t = msg.t * 2; return {msg: msg};",
            ),
            ("flow.TbRuleChainOutputNode", "Doubled", json!({})),
        ],
        &[(0, 1, "Success")],
    );
    let root = chain(
        "Root",
        &[
            (
                "flow.TbRuleChainInputNode",
                "call helper",
                json!({"ruleChainId": "helper"}),
            ),
            save(),
        ],
        &[(0, 1, "Doubled")],
    );
    let engine = Engine::start(&[("root.json", root), ("helper.json", helper)]);
    let device = engine.device("d");
    assert!(engine.telemetry(&device, json!({"t": 21})).await);
    assert_eq!(engine.latest(device.id)["t"], json!(42));
}

#[actix_rt::test]
async fn rest_api_call_sends_the_message_and_takes_the_answer() {
    // A real HTTP endpoint on loopback that records what it gets.
    let seen: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let recorded = seen.clone();
    let app = axum::Router::new().route(
        "/{*path}",
        axum::routing::any(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                let recorded = recorded.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    recorded
                        .lock()
                        .unwrap()
                        .push((uri.path().to_string(), auth, body));
                    if uri.path().ends_with("/fail") {
                        (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            "broken".to_string(),
                        )
                    } else {
                        (axum::http::StatusCode::OK, r#"{"answer": 42}"#.to_string())
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    actix_rt::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let call = |path: &str| {
        json!({"restEndpointUrlPattern": format!("http://{address}/devices/${{deviceName}}/{path}"),
               "requestMethod": "POST", "headers": {"Content-Type": "application/json"},
               "readTimeoutMs": 5000, "maxParallelRequestsCount": 4,
               "credentials": {"type": "basic", "username": "u", "password": "p"}})
    };
    let root = chain(
        "rest",
        &[
            (
                "filter.TbCheckMessageNode",
                "fail?",
                json!({"messageNames": ["fail"]}),
            ),
            ("rest.TbRestApiCallNode", "ok call", call("ok")),
            ("rest.TbRestApiCallNode", "failing call", call("fail")),
            save(),
            js(
                "transform.TbTransformMsgNode",
                "failure details",
                "return {msg: {code: metadata.statusCode, body: metadata.error_body}};",
            ),
        ],
        &[
            (0, 1, "False"),
            (0, 2, "True"),
            (1, 3, "Success"),
            (2, 4, "Failure"),
            (4, 3, "Success"),
        ],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let ok = engine.device("ok-device");
    assert!(engine.telemetry(&ok, json!({"t": 1})).await);
    assert_eq!(engine.latest(ok.id)["answer"], json!(42));
    let failing = engine.device("bad-device");
    assert!(engine.telemetry(&failing, json!({"fail": true})).await);
    let latest = engine.latest(failing.id);
    assert_eq!(latest["code"], json!("500"));
    assert_eq!(latest["body"], json!("broken"));

    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].0, "/devices/ok-device/ok");
    assert_eq!(seen[0].1, "Basic dTpw");
    assert_eq!(
        serde_json::from_str::<Value>(&seen[0].2).unwrap(),
        json!({"t": 1})
    );
}

#[actix_rt::test]
async fn telemetry_with_a_ttl_is_purged_and_the_latest_value_kept() {
    let root = chain(
        "ttl",
        &[(SAVE_TIMESERIES, "save", json!({"defaultTTL": 3600}))],
        &[],
    );
    let engine = Engine::start(&[("root.json", root)]);
    let device = engine.device("d");
    let now = shardflow::msg::now_millis();
    // Two hours old with a default TTL of an hour: expired.
    let old = json!({"ts": now - 7_200_000, "values": {"t": 1}});
    assert!(engine.telemetry(&device, old).await);
    // The message's TTL metadata wins over the default.
    let mut kept = message(
        &device,
        "POST_TELEMETRY_REQUEST",
        json!({"ts": now - 7_000_000, "values": {"u": 2}}),
    );
    kept.metadata.insert("TTL".into(), "86400".into());
    assert!(engine.send(kept).await);
    let fresh = json!({"ts": now, "values": {"t": 3}});
    assert!(engine.telemetry(&device, fresh).await);

    let purged = engine
        .store
        .purge_expired_telemetry(shardflow::msg::now_millis())
        .await
        .unwrap();
    assert_eq!(purged, 1);
    let history = engine
        .store
        .history(device.id, "t", 0, i64::MAX, 10)
        .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(
        engine
            .store
            .history(device.id, "u", 0, i64::MAX, 10)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(engine.latest(device.id)["t"], json!(3));
}

#[actix_rt::test]
async fn debug_events_record_what_went_in_and_out() {
    let mut root: Value = serde_json::from_str(&chain(
        "debugged",
        &[
            js("filter.TbJsFilterNode", "watched", "return msg.t > 1;"),
            save(),
        ],
        &[(0, 1, "True")],
    ))
    .unwrap();
    root["metadata"]["nodes"][0]["debugMode"] = json!(true);
    let engine = Engine::start(&[("root.json", root.to_string())]);
    let device = engine.device("d");
    assert!(engine.telemetry(&device, json!({"t": 5})).await);
    engine.store.flush().await.unwrap();
    let events = engine
        .store
        .debug_events(&shardflow::store::DebugEventFilter {
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1].direction, "IN");
    assert_eq!(events[0].direction, "OUT");
    assert_eq!(events[0].relation.as_deref(), Some("True"));
    assert!(events[0].node.contains("watched"));

    // The retention cap keeps the newest.
    for t in 0..3 {
        assert!(engine.telemetry(&device, json!({"t": t})).await);
    }
    let trim = shardflow::store::Write::TrimDebugEvents { max_count: 3 };
    engine.store.write(vec![trim], None).await.unwrap();
    let kept = engine
        .store
        .debug_events(&shardflow::store::DebugEventFilter {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(kept.len(), 3);
    assert!(kept[0].id > events[0].id);
}

#[actix_rt::test]
async fn unknown_node_types_may_send_messages_to_failure() {
    let root = chain(
        "unknown",
        &[
            ("action.TbCreateAlarmNode", "alarm", json!({})),
            js(
                "transform.TbTransformMsgNode",
                "note",
                "return {msg: {why: metadata.error}, msgType: 'POST_ATTRIBUTES_REQUEST'};",
            ),
            (SAVE_ATTRIBUTES, "save", json!({"scope": "SERVER_SCOPE"})),
        ],
        &[(0, 1, "Failure"), (1, 2, "Success")],
    );
    let engine = Engine::start_with(
        &[("root.json", root)],
        shardflow::chain::loader::UnknownNodes::Failure,
    );
    let device = engine.device("d");
    assert!(engine.telemetry(&device, json!({"t": 1})).await);
    let why = engine.attributes(device.id, Scope::Server)["why"].clone();
    assert!(why.as_str().unwrap().contains("TbCreateAlarmNode"), "{why}");
}
