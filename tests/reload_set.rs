//! Rule set reloads in process: what is replaced, what is kept, what an
//! invalid edit does, and that a replaced chain's timed nodes stop.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::engine::{chain, Engine, SAVE_TIMESERIES};
use serde_json::json;
use shardflow::chain::reload::Reloaded;
use shardflow::msg::EntityId;

fn helper() -> String {
    chain(
        "Helper",
        &[("flow.TbRuleChainOutputNode", "Back", json!({}))],
        &[],
    )
}

fn root(stamp: i64) -> String {
    chain(
        "Root",
        &[
            (
                "transform.TbTransformMsgNode",
                "stamp",
                json!({"jsScript": format!("msg.stamp = {stamp}; return {{msg: msg}};")}),
            ),
            (
                "flow.TbRuleChainInputNode",
                "call",
                json!({"ruleChainId": "helper"}),
            ),
            (SAVE_TIMESERIES, "save", json!({})),
        ],
        &[(0, 1, "Success"), (1, 2, "Back")],
    )
}

#[actix_rt::test]
async fn only_the_changed_chain_is_replaced_and_a_bad_edit_keeps_the_running_set() {
    let engine = Engine::start(&[("root.json", root(1)), ("helper.json", helper())]);
    let device = engine.device("d");
    assert!(engine.telemetry(&device, json!({"t": 1})).await);
    assert_eq!(engine.latest(device.id)["stamp"], json!(1));
    let before = engine.rules.current();

    std::fs::write(engine.chain_dir().join("root.json"), root(2)).unwrap();
    let Reloaded::Swapped { version, changes } = engine.rules.reload() else {
        panic!("not swapped")
    };
    assert_eq!(version, 2);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(changes[0].contains("root.json"), "{changes:?}");
    let after = engine.rules.current();
    assert!(Arc::ptr_eq(
        before.chain("helper").unwrap(),
        after.chain("helper").unwrap()
    ));
    assert!(!Arc::ptr_eq(before.root(), after.root()));
    assert!(engine.telemetry(&device, json!({"t": 2})).await);
    assert_eq!(engine.latest(device.id)["stamp"], json!(2));

    // A message that entered with the old set still goes through the old
    // root chain (and the shared helper).
    let done = {
        let (tx, rx) = tokio::sync::oneshot::channel::<bool>();
        struct Once(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<bool>>>);
        impl shardflow::delivery::CompletionSink for Once {
            fn complete(&self, _: u64, ok: bool) {
                if let Some(tx) = self.0.lock().unwrap().take() {
                    let _ = tx.send(ok);
                }
            }
        }
        let ticket = shardflow::delivery::Ticket::new(
            0,
            Arc::new(Once(std::sync::Mutex::new(Some(tx)))),
            Arc::default(),
        );
        let mut msg = common::engine::message(&device, "POST_TELEMETRY_REQUEST", json!({"t": 3}));
        msg.ts += 1000;
        msg.metadata.insert("ts".into(), msg.ts.to_string());
        before.submit(msg, ticket);
        rx
    };
    assert!(tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .unwrap()
        .unwrap());
    assert_eq!(engine.latest(device.id)["stamp"], json!(1));
    drop(before);

    // An invalid edit: rejected, reported, the running set stays; the same
    // files again are not reported twice.
    std::fs::write(engine.chain_dir().join("helper.json"), "{ broken").unwrap();
    let Reloaded::Rejected(problems) = engine.rules.reload() else {
        panic!("not rejected")
    };
    assert!(problems[0].contains("helper.json"), "{problems:?}");
    assert_eq!(engine.rules.reload(), Reloaded::Unchanged);
    let status = engine.rules.status();
    assert!(!status.ok && status.error.unwrap().contains("helper.json"));
    assert_eq!(engine.rules.current().version, 2);
    assert!(engine.telemetry(&device, json!({"t": 4})).await);

    std::fs::write(engine.chain_dir().join("helper.json"), helper()).unwrap();
    // The file is back as it was: the running set is already that.
    assert_eq!(engine.rules.reload(), Reloaded::Unchanged);
    assert!(engine.rules.status().ok);
}

#[actix_rt::test]
async fn a_replaced_chains_generator_stops() {
    let generator = |name: &str| {
        chain(
            "Root",
            &[
                (
                    "debug.TbMsgGeneratorNode",
                    "gen",
                    json!({"periodInSeconds": 1,
                           "jsScript": format!("return {{msg: {{{name}: 1}}, metadata: {{}}, msgType: 'POST_TELEMETRY_REQUEST'}};")}),
                ),
                (SAVE_TIMESERIES, "save", json!({})),
            ],
            &[(0, 1, "Success")],
        )
    };
    let engine = Engine::start(&[("root.json", generator("first"))]);
    let tenant = EntityId::tenant();
    let count = |key: &str| {
        engine
            .store
            .history(tenant, key, 0, i64::MAX, 1000)
            .unwrap()
            .len()
    };
    common::wait_for("a generated message", Duration::from_secs(10), || async {
        (count("first") > 0).then_some(())
    })
    .await;
    std::fs::write(engine.chain_dir().join("root.json"), generator("second")).unwrap();
    assert!(matches!(engine.rules.reload(), Reloaded::Swapped { .. }));
    common::wait_for("the new generator", Duration::from_secs(10), || async {
        (count("second") > 0).then_some(())
    })
    .await;
    let first = count("first");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(count("first"), first, "the replaced generator still runs");
    assert!(count("second") >= 2);
}
