//! The example chains shipped beside the root chain, loaded from the repo
//! as they are and run with messages.

mod common;

use common::engine::{chain, Engine};
use serde_json::json;
use shardflow::store::{KvValue, Scope, Write};

fn shipped(name: &str) -> String {
    std::fs::read_to_string(common::repo().join("rulechains").join(name)).unwrap()
}

/// A root chain that converts units, then checks the threshold.
fn caller() -> String {
    chain(
        "Root",
        &[
            (
                "filter.TbMsgTypeSwitchNode",
                "switch",
                json!({"version": 0}),
            ),
            (
                "flow.TbRuleChainInputNode",
                "convert",
                json!({"ruleChainId": "unit_conversion"}),
            ),
            (
                "flow.TbRuleChainInputNode",
                "alarm",
                json!({"ruleChainId": "threshold_alarm"}),
            ),
        ],
        &[(0, 1, "Post telemetry"), (1, 2, "Converted")],
    )
}

#[actix_rt::test]
async fn unit_conversion_then_threshold_alarm() {
    let engine = Engine::start(&[
        ("root.json", caller()),
        ("unit_conversion.json", shipped("unit_conversion.json")),
        ("threshold_alarm.json", shipped("threshold_alarm.json")),
    ]);

    // 86 °F is 30 °C, over the default threshold of 25.
    let hot = engine.device("hot");
    assert!(engine.telemetry(&hot, json!({"temperatureF": 86})).await);
    let latest = engine.latest(hot.id);
    assert_eq!(latest["temperature"], json!(30));
    assert!(!latest.contains_key("temperatureF"));
    let state = engine.attributes(hot.id, Scope::Server);
    assert_eq!(state["alarm"], json!("HIGH_TEMPERATURE"));
    assert_eq!(state["alarmTemperature"], json!(30));

    // A device's own threshold wins.
    let tolerant = engine.device("tolerant");
    let threshold = Write::Attributes {
        entity: tolerant.id,
        scope: Scope::Server,
        ts: 1,
        values: vec![("temperatureThreshold".into(), KvValue::Long(35))],
    };
    engine.store.write(vec![threshold], None).await.unwrap();
    assert!(
        engine
            .telemetry(&tolerant, json!({"temperature": 30}))
            .await
    );
    assert_eq!(engine.latest(tolerant.id)["temperature"], json!(30));
    assert_eq!(
        engine.attributes(tolerant.id, Scope::Server)["alarm"],
        json!("NONE")
    );

    // Celsius passes through unchanged; cool is no alarm.
    let cool = engine.device("cool");
    assert!(engine.telemetry(&cool, json!({"temperature": 20.5})).await);
    assert_eq!(engine.latest(cool.id)["temperature"], json!(20.5));
    assert_eq!(
        engine.attributes(cool.id, Scope::Server)["alarm"],
        json!("NONE")
    );
    assert!(
        engine.dead_letter_errors().is_empty(),
        "{:?}",
        engine.dead_letter_errors()
    );
}

#[test]
fn the_shipped_rule_chain_directory_loads_as_one_set() {
    let config = shardflow::chain::set::SetConfig {
        root_chain: common::repo().join("rulechains/root.json"),
        unknown_nodes: Default::default(),
        limits: shardflow::service::js_limits_default(),
        converters: Vec::new(),
    };
    let source = shardflow::chain::set::load(&config, None).unwrap_or_else(|p| panic!("{p:#?}"));
    let mut names: Vec<&str> = source.chains.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["Root Rule Chain", "Threshold Alarm", "Unit Conversion"]
    );
    assert_eq!(source.chains[source.root].name, "Root Rule Chain");
}
