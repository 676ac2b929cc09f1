//! TbGetAttributesNode ("originator attributes"): adds the originator's
//! attributes and latest telemetry to the message metadata (or, with
//! `fetchTo: DATA`, to the data). Attribute keys get ThingsBoard's
//! prefixes (`cs_` client, `shared_` shared, `ss_` server); telemetry keys
//! none. Key names may use `${metadata}` and `$[data]` patterns. With
//! `tellFailureIfAbsent`, a key that has no value sends the message to
//! `Failure`.

use serde_json::{json, Value};

use super::template::substitute;
use super::{data_object, failure, flag, string_list, success, MessageSide, NodeOutput};
use crate::chain::{Envelope, Services};
use crate::store::{Scope, TsValue};

#[derive(Debug, Clone)]
pub struct Config {
    pub client: Vec<String>,
    pub shared: Vec<String>,
    pub server: Vec<String>,
    pub latest: Vec<String>,
    pub fetch_to: MessageSide,
    pub fail_if_absent: bool,
    pub latest_with_ts: bool,
}

impl Config {
    pub fn parse(config: &Value) -> Result<Config, String> {
        let fetch_to = match config.get("fetchTo").and_then(Value::as_str) {
            None | Some("METADATA") => MessageSide::Metadata,
            Some("DATA") => MessageSide::Data,
            Some(other) => return Err(format!("fetchTo must be DATA or METADATA, got {other:?}")),
        };
        let parsed = Config {
            client: string_list(config, "clientAttributeNames")?,
            shared: string_list(config, "sharedAttributeNames")?,
            server: string_list(config, "serverAttributeNames")?,
            latest: string_list(config, "latestTsKeyNames")?,
            fetch_to,
            fail_if_absent: flag(config, "tellFailureIfAbsent", true)?,
            latest_with_ts: flag(config, "getLatestValueWithTs", false)?,
        };
        if [
            &parsed.client,
            &parsed.shared,
            &parsed.server,
            &parsed.latest,
        ]
        .iter()
        .all(|keys| keys.is_empty())
        {
            return Err("no attribute or telemetry key names are configured".into());
        }
        Ok(parsed)
    }
}

/// One group of keys to look up: where from, and the prefix of the result.
struct Lookup {
    scope: Option<Scope>,
    prefix: &'static str,
    keys: Vec<String>,
}

pub fn process(config: &Config, env: Envelope, services: &Services) -> NodeOutput {
    let keys = |names: &[String]| -> Vec<String> {
        names.iter().map(|n| substitute(n, &env.msg)).collect()
    };
    let lookups = vec![
        Lookup {
            scope: Some(Scope::Client),
            prefix: "cs_",
            keys: keys(&config.client),
        },
        Lookup {
            scope: Some(Scope::Shared),
            prefix: "shared_",
            keys: keys(&config.shared),
        },
        Lookup {
            scope: Some(Scope::Server),
            prefix: "ss_",
            keys: keys(&config.server),
        },
        Lookup {
            scope: None,
            prefix: "",
            keys: keys(&config.latest),
        },
    ];
    let store = services.store.clone();
    let config = config.clone();
    NodeOutput::Later(Box::pin(async move {
        let originator = env.msg.originator;
        let found = actix_rt::task::spawn_blocking(move || {
            let mut found = Vec::new();
            for lookup in lookups.into_iter().filter(|l| !l.keys.is_empty()) {
                let values = match lookup.scope {
                    Some(scope) => store.attributes(originator, scope, &lookup.keys)?,
                    None => store.latest(originator, &lookup.keys)?,
                };
                found.push((lookup, values));
            }
            Ok::<_, crate::store::StoreError>(found)
        })
        .await;
        match found {
            Ok(Ok(found)) => enrich(&config, env, found),
            Ok(Err(e)) => vec![failure(env, format!("cannot read attributes: {e}"))],
            Err(e) => vec![failure(env, format!("attribute read failed: {e}"))],
        }
    }))
}

fn enrich(
    config: &Config,
    mut env: Envelope,
    found: Vec<(Lookup, Vec<TsValue>)>,
) -> Vec<(String, Envelope)> {
    let mut fields = Vec::new();
    for (lookup, values) in found {
        if config.fail_if_absent {
            if let Some(missing) = lookup
                .keys
                .iter()
                .find(|k| !values.iter().any(|v| &v.key == *k))
            {
                let what = match lookup.scope {
                    Some(scope) => format!("[{}][{missing}] attribute", scope.as_str()),
                    None => format!("[{missing}] telemetry"),
                };
                return vec![failure(
                    env,
                    format!("{what} value is not present in the store"),
                )];
            }
        }
        for value in values {
            let key = format!("{}{}", lookup.prefix, value.key);
            if config.latest_with_ts && lookup.scope.is_none() {
                let with_ts = json!({"ts": value.ts, "value": value.value.to_json()});
                fields.push((key, with_ts.to_string(), with_ts));
            } else {
                fields.push((key, value.value.to_text(), value.value.to_json()));
            }
        }
    }
    match config.fetch_to {
        MessageSide::Metadata => {
            for (key, text, _) in fields {
                env.msg.metadata.insert(key, text);
            }
        }
        MessageSide::Data => {
            let mut data = match data_object(&env) {
                Ok(data) => data,
                Err(reason) => return vec![failure(env, reason)],
            };
            for (key, _, value) in fields {
                data.insert(key, value);
            }
            env.msg.data = Value::Object(data).to_string();
        }
    }
    vec![success(env)]
}
