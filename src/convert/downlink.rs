//! The downlink converter's result: records to put on a Kinesis stream.
//!
//! `Encoder(msg, metadata, msgType, integrationMetadata)` returns an object
//! or an array of `{contentType, data, metadata: {streamName, partitionKey,
//! explicitHashKey?}}`. BINARY data is base64 text and is decoded here, once.

use base64::Engine as _;
use serde_json::Value;

/// One record to put on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownlinkRecord {
    pub stream_name: String,
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("downlink converter output {path}: {reason}")]
pub struct DownlinkError {
    pub path: String,
    pub reason: String,
}

fn error(path: impl Into<String>, reason: impl Into<String>) -> DownlinkError {
    DownlinkError {
        path: path.into(),
        reason: reason.into(),
    }
}

pub fn parse(output: Value) -> Result<Vec<DownlinkRecord>, DownlinkError> {
    match output {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| parse_item(item, &format!("[{i}]")))
            .collect(),
        Value::Object(_) => Ok(vec![parse_item(output, "")?]),
        Value::Null => Err(error("", "the encoder returned nothing")),
        _ => Err(error("", "expected an object or an array of objects")),
    }
}

fn parse_item(item: Value, path: &str) -> Result<DownlinkRecord, DownlinkError> {
    let content_type = item
        .get("contentType")
        .and_then(Value::as_str)
        .unwrap_or("JSON")
        .to_ascii_uppercase();
    let data = match item.get("data") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => return Err(error(format!("{path}.data"), "is missing")),
        // A converter that forgot JSON.stringify still means the JSON text.
        Some(other) => other.to_string(),
    };
    let data = match content_type.as_str() {
        "JSON" | "TEXT" => data.into_bytes(),
        "BINARY" => base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| {
                error(
                    format!("{path}.data"),
                    format!("BINARY data is not base64: {e}"),
                )
            })?,
        other => {
            return Err(error(
                format!("{path}.contentType"),
                format!("{other:?} is not one of JSON, TEXT, BINARY"),
            ))
        }
    };
    let metadata = item.get("metadata").and_then(Value::as_object);
    let field = |key: &str| {
        metadata
            .and_then(|m| m.get(key))
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .filter(|s| !s.is_empty())
    };
    let stream_name = field("streamName").ok_or_else(|| {
        error(
            format!("{path}.metadata.streamName"),
            "is missing: no stream to send to",
        )
    })?;
    if stream_name.contains("${") {
        return Err(error(
            format!("{path}.metadata.streamName"),
            format!("{stream_name:?} is an unresolved template, not a stream name"),
        ));
    }
    let partition_key = field("partitionKey")
        .ok_or_else(|| error(format!("{path}.metadata.partitionKey"), "is missing"))?;
    Ok(DownlinkRecord {
        stream_name,
        partition_key,
        explicit_hash_key: field("explicitHashKey"),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn walkthrough_shape() {
        let out = parse(json!({"contentType": "JSON", "data": "{\"a\":1}",
            "metadata": {"streamName": "s", "partitionKey": "123"}}))
        .unwrap();
        assert_eq!(out[0].data, b"{\"a\":1}");
        assert_eq!(out[0].partition_key, "123");
    }

    #[test]
    fn binary_is_decoded_once() {
        let out = parse(json!([{"contentType": "BINARY", "data": "AAH/",
            "metadata": {"streamName": "s", "partitionKey": "k"}}]))
        .unwrap();
        assert_eq!(out[0].data, vec![0, 1, 255]);
    }

    #[test]
    fn missing_or_templated_stream_is_an_error() {
        assert!(parse(json!({"data": "x", "metadata": {"partitionKey": "k"}})).is_err());
        assert!(parse(
            json!({"data": "x", "metadata": {"streamName": "${streamName}", "partitionKey": "k"}})
        )
        .is_err());
    }
}
