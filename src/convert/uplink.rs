//! The uplink converter's result, checked against ThingsBoard's contract.
//!
//! `Decoder(payload, metadata)` returns an object or an array of objects,
//! each naming a device (`deviceName`) or an asset (`assetName`) with its
//! telemetry and attributes. This module turns that JSON into typed
//! [`Uplink`]s, or says exactly what is wrong with it.

use serde_json::{Map, Value};

use crate::msg::EntityType;

/// One entity's share of a converted record.
#[derive(Debug, Clone, PartialEq)]
pub struct Uplink {
    pub entity_type: EntityType,
    pub name: String,
    /// `deviceType`/`assetType`; `default` when absent.
    pub profile: String,
    pub label: Option<String>,
    pub customer_name: Option<String>,
    pub group_name: Option<String>,
    /// Telemetry values grouped by timestamp; `None` means "no ts given"
    /// and is replaced by the record's arrival time.
    pub telemetry: Telemetry,
    pub attributes: Map<String, Value>,
}

/// Telemetry values grouped by optional timestamp.
pub type Telemetry = Vec<(Option<i64>, Map<String, Value>)>;

/// Why a converter result was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("converter output {path}: {reason}")]
pub struct UplinkError {
    pub path: String,
    pub reason: String,
}

fn error(path: impl Into<String>, reason: impl Into<String>) -> UplinkError {
    UplinkError {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Most devices and assets one record may update.
pub const MAX_ENTITIES_PER_RECORD: usize = 10_000;

/// Timestamps accepted: from the epoch to the end of year 9999, in ms.
pub const MAX_TS: i64 = 253_402_300_799_999;

/// Parses a `Decoder` result. Any invalid item rejects the whole record so
/// that a record is either stored completely or kept as a dead letter.
pub fn parse(output: Value) -> Result<Vec<Uplink>, UplinkError> {
    match output {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(error("[]", "the array is empty: no device to update"));
            }
            if items.len() > MAX_ENTITIES_PER_RECORD {
                return Err(error(
                    "[]",
                    format!(
                        "{} devices in one record; at most {MAX_ENTITIES_PER_RECORD} are accepted",
                        items.len()
                    ),
                ));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| parse_item(item, &format!("[{i}]")))
                .collect()
        }
        Value::Object(_) => Ok(vec![parse_item(output, "")?]),
        other => Err(error(
            "",
            format!(
                "expected an object or an array of objects, got {}",
                json_kind(&other)
            ),
        )),
    }
}

fn parse_item(item: Value, path: &str) -> Result<Uplink, UplinkError> {
    let Value::Object(mut object) = item else {
        return Err(error(
            path,
            format!("expected an object, got {}", json_kind(&item)),
        ));
    };
    let (entity_type, name, type_key) = match (
        take_string(&mut object, "deviceName"),
        take_string(&mut object, "assetName"),
    ) {
        (Some(name), _) => (EntityType::Device, name, "deviceType"),
        (None, Some(name)) => (EntityType::Asset, name, "assetType"),
        (None, None) => {
            return Err(error(
                path,
                "has no deviceName (or assetName): the record names no device",
            ))
        }
    };
    if name.trim().is_empty() {
        return Err(error(path, "deviceName is empty"));
    }
    let profile = take_string(&mut object, type_key)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let telemetry = match object.remove("telemetry") {
        None | Some(Value::Null) => Vec::new(),
        Some(value) => parse_telemetry(value, &format!("{path}.telemetry"))?,
    };
    let attributes = match object.remove("attributes") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(error(
                format!("{path}.attributes"),
                format!("expected an object, got {}", json_kind(&other)),
            ))
        }
    };
    Ok(Uplink {
        entity_type,
        name,
        profile,
        label: take_string(&mut object, "deviceLabel")
            .or_else(|| take_string(&mut object, "assetLabel")),
        customer_name: take_string(&mut object, "customerName"),
        group_name: take_string(&mut object, "groupName"),
        telemetry,
        attributes,
    })
}

fn parse_telemetry(value: Value, path: &str) -> Result<Telemetry, UplinkError> {
    match value {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| parse_ts_entry(item, &format!("{path}[{i}]")))
            .collect(),
        other => Ok(vec![parse_ts_entry(other, path)?]),
    }
}

/// One `{ts, values}` entry, or a flat object of values without a ts.
fn parse_ts_entry(
    value: Value,
    path: &str,
) -> Result<(Option<i64>, Map<String, Value>), UplinkError> {
    let Value::Object(mut object) = value else {
        return Err(error(
            path,
            format!("expected an object, got {}", json_kind(&value)),
        ));
    };
    if object.contains_key("ts") && object.contains_key("values") {
        let ts = parse_ts(object.remove("ts").unwrap_or(Value::Null))
            .filter(|ts| (0..=MAX_TS).contains(ts))
            .ok_or_else(|| {
                error(
                    format!("{path}.ts"),
                    "expected milliseconds since the epoch, up to the year 9999",
                )
            })?;
        return match object.remove("values") {
            Some(Value::Object(values)) => Ok((Some(ts), values)),
            other => Err(error(
                format!("{path}.values"),
                format!(
                    "expected an object, got {}",
                    json_kind(&other.unwrap_or(Value::Null))
                ),
            )),
        };
    }
    Ok((None, object))
}

fn parse_ts(value: Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && f.abs() < 1e18)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn take_string(object: &mut Map<String, Value>, key: &str) -> Option<String> {
    match object.remove(key)? {
        Value::String(s) => Some(s),
        Value::Null => None,
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        other => Some(other.to_string()),
    }
}

/// The kind of a JSON value, for errors.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flat_telemetry_has_no_ts() {
        let out = parse(json!({"deviceName": "d", "telemetry": {"t": 1}})).unwrap();
        assert_eq!(out[0].profile, "default");
        assert_eq!(
            out[0].telemetry,
            vec![(None, json!({"t": 1}).as_object().unwrap().clone())]
        );
    }

    #[test]
    fn ts_values_and_arrays_of_them() {
        let out = parse(json!([
            {"deviceName": "a", "deviceType": "x", "telemetry": {"ts": 5, "values": {"t": 1}}},
            {"assetName": "b", "telemetry": [{"ts": 6, "values": {"t": 2}}, {"ts": "7", "values": {"t": 3}}],
             "attributes": {"fw": "1.0"}}
        ]))
        .unwrap();
        assert_eq!(out[0].telemetry[0].0, Some(5));
        assert_eq!(out[1].entity_type, EntityType::Asset);
        assert_eq!(out[1].telemetry.len(), 2);
        assert_eq!(out[1].telemetry[1].0, Some(7));
        assert_eq!(out[1].attributes["fw"], json!("1.0"));
    }

    #[test]
    fn missing_device_name_rejects_the_whole_record() {
        let err = parse(json!([{"deviceName": "a"}, {"telemetry": {"t": 1}}])).unwrap_err();
        assert_eq!(err.path, "[1]");
        assert!(err.reason.contains("deviceName"));
    }

    #[test]
    fn absurd_timestamps_are_rejected() {
        for ts in [json!(1e30), json!(-5), json!(253_402_300_800_000i64)] {
            let out =
                parse(json!({"deviceName": "d", "telemetry": {"ts": ts, "values": {"t": 1}}}));
            assert!(out.is_err(), "{ts}");
        }
    }

    #[test]
    fn non_object_results_are_rejected() {
        assert!(parse(json!(42)).is_err());
        assert!(parse(json!(null)).is_err());
        assert!(parse(json!([])).is_err());
    }
}
