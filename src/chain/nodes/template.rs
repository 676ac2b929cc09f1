//! ThingsBoard's name patterns in node configurations: `${key}` takes the
//! message metadata's value of `key`, `$[key]` the message data's field
//! (`$[a.b]` a nested one). A pattern whose key is absent is left as it is,
//! as ThingsBoard does.

use serde_json::Value;

use crate::msg::TbMsg;

/// Substitutes the patterns of `template` from `msg`.
pub fn substitute(template: &str, msg: &TbMsg) -> String {
    if !template.contains('$') {
        return template.to_string();
    }
    let data: Option<Value> = template
        .contains("$[")
        .then(|| serde_json::from_str(&msg.data).ok())
        .flatten();
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let (open, close) = match tail.as_bytes().get(1) {
            Some(b'{') => ('{', '}'),
            Some(b'[') => ('[', ']'),
            _ => {
                out.push('$');
                rest = &tail[1..];
                continue;
            }
        };
        let Some(end) = tail.find(close) else {
            out.push_str(tail);
            return out;
        };
        let key = &tail[2..end];
        let value = if open == '{' {
            msg.metadata.get(key).cloned()
        } else {
            data.as_ref().and_then(|d| field(d, key))
        };
        match value {
            Some(value) => out.push_str(&value),
            None => out.push_str(&tail[..=end]),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

fn field(data: &Value, path: &str) -> Option<String> {
    let value = path
        .split('.')
        .try_fold(data, |value, part| value.get(part))?;
    Some(match value {
        Value::String(s) => s.clone(),
        Value::Null => return None,
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{EntityId, EntityType};

    #[test]
    fn metadata_and_data_patterns_are_filled_in() {
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("deviceName".to_string(), "kitchen".to_string());
        let msg = TbMsg::new(
            "T",
            EntityId {
                entity_type: EntityType::Device,
                id: uuid::Uuid::nil(),
            },
            metadata,
            r#"{"room": {"floor": 2}, "t": 21.5}"#.into(),
            0,
        );
        assert_eq!(
            substitute("${deviceName}-$[room.floor]/$[t] ${missing} $5", &msg),
            "kitchen-2/21.5 ${missing} $5"
        );
        assert_eq!(substitute("${unclosed", &msg), "${unclosed");
    }
}
