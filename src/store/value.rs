//! Telemetry and attribute values with ThingsBoard's five kinds.

use serde_json::Value;

/// A stored value: ThingsBoard's BOOLEAN, LONG, DOUBLE, STRING and JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum KvValue {
    Bool(bool),
    Long(i64),
    Double(f64),
    Str(String),
    Json(String),
}

impl KvValue {
    /// The kind ThingsBoard gives a JSON value; `None` for null and for
    /// numbers beyond a double's range, which are not stored.
    pub fn from_json(value: &Value) -> Option<KvValue> {
        Some(match value {
            Value::Null => return None,
            Value::Bool(b) => KvValue::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => KvValue::Long(i),
                None => KvValue::Double(n.as_f64().filter(|f| f.is_finite())?),
            },
            Value::String(s) => KvValue::Str(s.clone()),
            Value::Array(_) | Value::Object(_) => KvValue::Json(value.to_string()),
        })
    }

    /// The value as ThingsBoard's API shows it with strict data types.
    pub fn to_json(&self) -> Value {
        match self {
            KvValue::Bool(b) => Value::Bool(*b),
            KvValue::Long(i) => Value::from(*i),
            KvValue::Double(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            KvValue::Str(s) => Value::String(s.clone()),
            KvValue::Json(text) => {
                serde_json::from_str(text).unwrap_or(Value::String(text.clone()))
            }
        }
    }

    /// The value as text, as ThingsBoard's API shows it without strict
    /// data types.
    pub fn to_text(&self) -> String {
        match self {
            KvValue::Bool(b) => b.to_string(),
            KvValue::Long(i) => i.to_string(),
            KvValue::Double(f) => f.to_string(),
            KvValue::Str(s) | KvValue::Json(s) => s.clone(),
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            KvValue::Bool(_) => "BOOLEAN",
            KvValue::Long(_) => "LONG",
            KvValue::Double(_) => "DOUBLE",
            KvValue::Str(_) => "STRING",
            KvValue::Json(_) => "JSON",
        }
    }

    /// Column values: (kind, long_v, dbl_v, str_v).
    pub(crate) fn columns(&self) -> (i64, Option<i64>, Option<f64>, Option<&str>) {
        match self {
            KvValue::Bool(b) => (0, Some(*b as i64), None, None),
            KvValue::Long(i) => (1, Some(*i), None, None),
            KvValue::Double(f) => (2, None, Some(*f), None),
            KvValue::Str(s) => (3, None, None, Some(s)),
            KvValue::Json(s) => (4, None, None, Some(s)),
        }
    }

    pub(crate) fn from_columns(
        kind: i64,
        long_v: Option<i64>,
        dbl_v: Option<f64>,
        str_v: Option<String>,
    ) -> KvValue {
        match kind {
            0 => KvValue::Bool(long_v.unwrap_or(0) != 0),
            1 => KvValue::Long(long_v.unwrap_or(0)),
            2 => KvValue::Double(dbl_v.unwrap_or(0.0)),
            4 => KvValue::Json(str_v.unwrap_or_default()),
            _ => KvValue::Str(str_v.unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_follow_thingsboard() {
        assert_eq!(KvValue::from_json(&json!(22)), Some(KvValue::Long(22)));
        assert_eq!(
            KvValue::from_json(&json!(22.5)),
            Some(KvValue::Double(22.5))
        );
        assert_eq!(KvValue::from_json(&json!(true)), Some(KvValue::Bool(true)));
        assert_eq!(
            KvValue::from_json(&json!({"a": 1})),
            Some(KvValue::Json("{\"a\":1}".into()))
        );
        assert_eq!(KvValue::from_json(&json!(null)), None);
    }
}
