//! shardflow's own endpoints about integrations: the status of each
//! integration and shard, and the converter test.
//!
//! The converter test runs a converter (the one the running rule set
//! loaded, or an edited copy of it) on a payload given by the user, on the same converter pool,
//! with the same script environment, limits and result checks as records
//! and downlinks, like ThingsBoard's "Test decoder/encoder" dialogs. It
//! writes nothing: no device is created and nothing is sent.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::{blocking, json_body, ApiError, ApiResult, ApiState};
use crate::convert::{DownlinkRecord, Script, ScriptKind, TestInput, TestResult, TestRun, Uplink};
use crate::delivery::SourceRecord;
use crate::msg;
use crate::status::ShardState;

/// An integration's name and uplink stream. Its converters are those of
/// the running rule set (they are reloaded with it).
pub struct IntegrationInfo {
    pub name: String,
    pub stream: String,
}

fn state_name(state: ShardState) -> &'static str {
    match state {
        ShardState::Starting => "STARTING",
        ShardState::Reading => "READING",
        ShardState::Retrying => "RETRYING",
        ShardState::Finished => "FINISHED",
        ShardState::Failed => "FAILED",
    }
}

/// `GET /api/shardflow/integrations`: per integration, its shards (state,
/// checkpoint, MillisBehindLatest, records read and per second, records
/// failed, in flight, last error) and its dead letters not replayed.
pub async fn status(State(state): State<ApiState>) -> ApiResult<Json<Value>> {
    let store = state.store.clone();
    let dead_letters =
        blocking(move || store.dead_letter_counts().map_err(ApiError::internal)).await?;
    let snapshot = state.status.snapshot();
    let pending = state.status.pending();
    let integrations: Vec<Value> = state
        .integrations
        .iter()
        .map(|integration| {
            let shards: Vec<Value> = snapshot
                .iter()
                .filter(|((name, _), _)| *name == integration.name)
                .map(|((_, shard), s)| {
                    json!({
                        "shardId": shard,
                        "state": state_name(s.state),
                        "checkpoint": s.checkpoint,
                        "millisBehindLatest": s.millis_behind_latest,
                        "recordsRead": s.records_read,
                        "recordsPerSecond": (s.records_per_second() * 10.0).round() / 10.0,
                        "recordsFailed": s.records_failed,
                        "inFlight": s.in_flight,
                        "lastError": s.last_error,
                    })
                })
                .collect();
            json!({
                "name": integration.name,
                "stream": integration.stream,
                "pending": pending.get(&integration.name),
                "deadLetters": dead_letters.get(&integration.name).copied().unwrap_or(0),
                "shards": shards,
            })
        })
        .collect();
    Ok(Json(json!({ "integrations": integrations })))
}

/// `GET /api/shardflow/converters`: each integration's converter files and
/// their text, for the converter test page.
pub async fn converters(State(state): State<ApiState>) -> Json<Value> {
    let set = state.rules.current();
    let script = |s: &Script| json!({"file": s.origin, "body": s.body});
    let list: Vec<Value> = state
        .integrations
        .iter()
        .map(|i| {
            json!({
                "integration": i.name,
                "stream": i.stream,
                "uplink": set.decoders.get(&i.name).map(|s| script(s)),
                "downlink": set.encoders.get(&i.name).map(|s| script(s)),
                "rulesVersion": set.version,
            })
        })
        .collect();
    Json(json!({ "converters": list }))
}

/// The metadata fields a Kinesis record gives `Decoder`, besides
/// `integrationName` (always the integration's name).
const RECORD_METADATA: [&str; 7] = [
    "streamName",
    "shardId",
    "partitionKey",
    "sequenceNumber",
    "approximateArrivalTimestamp",
    "subSequenceNumber",
    "explicitHashKey",
];

/// `POST /api/shardflow/converters/test`:
/// `{integration, kind: "uplink"|"downlink", script?, payload,
/// payloadType?: "TEXT"|"JSON"|"BASE64", metadata?, msgType?}`. Answers
/// `{ok, returned, output, error}`: what the script returned, the result as
/// the runtime reads it, or the error the runtime would report.
pub async fn test(State(state): State<ApiState>, body: Bytes) -> ApiResult<Json<Value>> {
    let body = json_body(&body)?;
    let text = |key: &str| body.get(key).and_then(Value::as_str);
    let integration = match text("integration") {
        Some(name) => state.integrations.iter().find(|i| i.name == name),
        None if state.integrations.len() == 1 => state.integrations.first(),
        None => None,
    }
    .ok_or_else(|| ApiError::bad_request("integration must name a configured integration"))?;
    let kind = match text("kind").unwrap_or("uplink") {
        "uplink" => ScriptKind::Decoder,
        "downlink" => ScriptKind::Encoder,
        other => {
            return Err(ApiError::bad_request(format!(
                "kind {other:?}: use uplink or downlink"
            )))
        }
    };
    let set = state.rules.current();
    let loaded = match kind {
        ScriptKind::Encoder => set.encoders.get(&integration.name),
        _ => set.decoders.get(&integration.name),
    };
    let configured = loaded.cloned().ok_or_else(|| {
        ApiError::bad_request(format!(
            "integration {} has no {} converter",
            integration.name,
            if kind == ScriptKind::Encoder {
                "downlink"
            } else {
                "uplink"
            }
        ))
    })?;
    let script = match text("script") {
        Some(edited) if edited != configured.body => Script::new(
            kind,
            format!("{} (edited)", configured.origin),
            edited.to_string(),
        ),
        _ => configured,
    };
    let metadata = string_map(body.get("metadata"))?;
    let input = match kind {
        ScriptKind::Encoder => TestInput::Downlink {
            data: payload_text(&body)?,
            metadata,
            msg_type: text("msgType")
                .unwrap_or(msg::ATTRIBUTES_UPDATED)
                .to_string(),
            integration_metadata: BTreeMap::new(),
        },
        _ => TestInput::Uplink(Arc::new(test_record(
            &integration.name,
            &integration.stream,
            payload_bytes(&body)?,
            &metadata,
        )?)),
    };
    let outcome = state
        .js
        .send(TestRun { script, input })
        .await
        .map_err(|_| ApiError::internal("the converter pool is not running"))?;
    Ok(Json(match outcome.result {
        Ok(result) => json!({
            "ok": true,
            "returned": outcome.returned,
            "output": match result {
                TestResult::Uplink(uplinks) => uplinks.iter().map(uplink_json).collect::<Vec<_>>(),
                TestResult::Downlink(records) => records.iter().map(downlink_json).collect(),
            },
            "error": null,
        }),
        Err(error) => json!({
            "ok": false,
            "returned": outcome.returned,
            "output": null,
            "error": error.to_string(),
        }),
    }))
}

/// `metadata` as a string map: strings as they are, numbers and booleans as
/// their text.
fn string_map(value: Option<&Value>) -> ApiResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    match value {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (key, value) in map {
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(_) | Value::Bool(_) => value.to_string(),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "metadata {key:?} must be a string, a number or a boolean"
                        )))
                    }
                };
                out.insert(key.clone(), text);
            }
        }
        Some(_) => return Err(ApiError::bad_request("metadata must be an object")),
    }
    Ok(out)
}

fn payload_type(body: &Value) -> ApiResult<&str> {
    match body
        .get("payloadType")
        .and_then(Value::as_str)
        .unwrap_or("TEXT")
    {
        t @ ("TEXT" | "JSON" | "BASE64") => Ok(t),
        other => Err(ApiError::bad_request(format!(
            "payloadType {other:?}: use TEXT, JSON or BASE64"
        ))),
    }
}

/// The payload's bytes, as the record would carry them.
fn payload_bytes(body: &Value) -> ApiResult<Vec<u8>> {
    let payload = body
        .get("payload")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("payload must be given as a string"))?;
    match payload_type(body)? {
        "BASE64" => base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| ApiError::bad_request(format!("the payload is not valid base64: {e}"))),
        "JSON" => {
            serde_json::from_str::<Value>(payload).map_err(|e| {
                ApiError::bad_request(format!("the payload is not valid JSON: {e}"))
            })?;
            Ok(payload.as_bytes().to_vec())
        }
        _ => Ok(payload.as_bytes().to_vec()),
    }
}

/// The message data for a downlink test: a JSON text (`msg` is parsed from
/// it when it is JSON, as in the chain).
fn payload_text(body: &Value) -> ApiResult<String> {
    let bytes = payload_bytes(body)?;
    String::from_utf8(bytes)
        .map_err(|_| ApiError::bad_request("a downlink message must be UTF-8 text"))
}

/// A record as a shard would hand it over, from the test's metadata.
fn test_record(
    integration: &str,
    stream: &str,
    payload: Vec<u8>,
    metadata: &BTreeMap<String, String>,
) -> ApiResult<SourceRecord> {
    if let Some(key) = metadata
        .keys()
        .find(|k| *k != "integrationName" && !RECORD_METADATA.contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(format!(
            "metadata {key:?} is not given to uplink converters; a Kinesis record has {}",
            RECORD_METADATA.join(", ")
        )));
    }
    let get = |key: &str, default: &str| {
        metadata
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let arrival_ms = match metadata.get("approximateArrivalTimestamp") {
        None => msg::now_millis(),
        Some(v) => v.parse().map_err(|_| {
            ApiError::bad_request("approximateArrivalTimestamp must be epoch milliseconds")
        })?,
    };
    // A user record of a KPL aggregate has these two as well.
    let sub_sequence_number = match metadata.get("subSequenceNumber") {
        None => None,
        Some(v) => Some(v.parse().map_err(|_| {
            ApiError::bad_request("subSequenceNumber must be a non-negative integer")
        })?),
    };
    Ok(SourceRecord {
        integration: integration.into(),
        stream: get("streamName", stream).into(),
        shard: get("shardId", "shardId-000000000000").into(),
        sequence_number: get("sequenceNumber", "0"),
        sub_sequence_number,
        partition_key: get("partitionKey", "test"),
        explicit_hash_key: metadata.get("explicitHashKey").cloned(),
        arrival_ms,
        payload: payload.into(),
    })
}

fn uplink_json(uplink: &Uplink) -> Value {
    let telemetry: Vec<Value> = uplink
        .telemetry
        .iter()
        .map(|(ts, values)| json!({"ts": ts, "values": Value::Object(values.clone())}))
        .collect();
    json!({
        "entityType": uplink.entity_type.as_str(),
        "name": uplink.name,
        "type": uplink.profile,
        "label": uplink.label,
        "customerName": uplink.customer_name,
        "groupName": uplink.group_name,
        "telemetry": telemetry,
        "attributes": Value::Object(uplink.attributes.clone()),
    })
}

fn downlink_json(record: &DownlinkRecord) -> Value {
    let mut out = Map::new();
    out.insert("streamName".into(), json!(record.stream_name));
    out.insert("partitionKey".into(), json!(record.partition_key));
    out.insert("explicitHashKey".into(), json!(record.explicit_hash_key));
    out.insert("data".into(), json!(std::str::from_utf8(&record.data).ok()));
    out.insert(
        "dataBase64".into(),
        json!(base64::engine::general_purpose::STANDARD.encode(&record.data)),
    );
    Value::Object(out)
}
