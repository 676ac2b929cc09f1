//! Turns a converted record into rule-engine messages, as ThingsBoard's
//! integrations do: find or create the device (or asset), then one
//! POST_TELEMETRY_REQUEST per distinct ts and one POST_ATTRIBUTES_REQUEST.
//! A new entity also produces ENTITY_CREATED.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::convert::Uplink;
use crate::delivery::{SourceRecord, Ticket};
use crate::msg::{self, TbMsg};
use crate::store::{Entity, EntityDraft, Store, StoreError};

/// The messages for one record's converted uplinks, in the order they enter
/// the chain.
pub fn uplink_messages(
    uplinks: &[Uplink],
    source: &SourceRecord,
    store: &Store,
    ticket: &Ticket,
) -> Result<Vec<TbMsg>, StoreError> {
    let mut messages = Vec::new();
    for uplink in uplinks {
        let draft = EntityDraft {
            entity_type: uplink.entity_type,
            name: &uplink.name,
            profile: &uplink.profile,
            label: uplink.label.as_deref(),
            customer_name: uplink.customer_name.as_deref(),
            group_name: uplink.group_name.as_deref(),
        };
        let (entity, created) = store.ensure_entity(draft, Some(ticket.clone()))?;
        let metadata = entity_metadata(&entity, &source.integration);
        if created {
            messages.push(TbMsg::new(
                msg::ENTITY_CREATED,
                entity.id,
                metadata.clone(),
                entity_json(&entity).to_string(),
                msg::now_millis(),
            ));
        }
        for (ts, values) in group_by_ts(uplink, source.arrival_ms) {
            let mut metadata = metadata.clone();
            metadata.insert("ts".into(), ts.to_string());
            messages.push(TbMsg::new(
                msg::POST_TELEMETRY_REQUEST,
                entity.id,
                metadata,
                Value::Object(values).to_string(),
                ts,
            ));
        }
        if !uplink.attributes.is_empty() {
            messages.push(TbMsg::new(
                msg::POST_ATTRIBUTES_REQUEST,
                entity.id,
                metadata,
                Value::Object(uplink.attributes.clone()).to_string(),
                msg::now_millis(),
            ));
        }
    }
    Ok(messages)
}

/// Telemetry merged per timestamp; entries without a ts take the record's
/// arrival time, so a replayed record overwrites rather than duplicates.
fn group_by_ts(uplink: &Uplink, arrival_ms: i64) -> BTreeMap<i64, Map<String, Value>> {
    let mut groups: BTreeMap<i64, Map<String, Value>> = BTreeMap::new();
    for (ts, values) in &uplink.telemetry {
        if values.is_empty() {
            continue;
        }
        let group = groups.entry(ts.unwrap_or(arrival_ms)).or_default();
        for (k, v) in values {
            group.insert(k.clone(), v.clone());
        }
    }
    groups
}

/// Metadata every message about `entity` carries.
pub fn entity_metadata(entity: &Entity, integration: &str) -> BTreeMap<String, String> {
    let mut metadata = BTreeMap::new();
    let (name_key, type_key) = match entity.id.entity_type {
        msg::EntityType::Device => ("deviceName", "deviceType"),
        msg::EntityType::Asset | msg::EntityType::Tenant => ("assetName", "assetType"),
    };
    metadata.insert(name_key.to_string(), entity.name.clone());
    metadata.insert(type_key.to_string(), entity.profile.clone());
    if !integration.is_empty() {
        metadata.insert("integrationName".to_string(), integration.to_string());
    }
    metadata
}

/// The entity as ThingsBoard's Device/Asset JSON.
pub fn entity_json(entity: &Entity) -> Value {
    let mut additional = Map::new();
    if let Some(customer) = &entity.customer_name {
        additional.insert("customerName".into(), json!(customer));
    }
    if let Some(group) = &entity.group_name {
        additional.insert("groupName".into(), json!(group));
    }
    json!({
        "id": {"entityType": entity.id.entity_type.as_str(), "id": entity.id.id},
        "createdTime": entity.created_time,
        "tenantId": {"entityType": "TENANT", "id": msg::TENANT_ID},
        "customerId": {"entityType": "CUSTOMER", "id": "13814000-1dd2-11b2-8080-808080808080"},
        "name": entity.name,
        "type": entity.profile,
        "label": entity.label,
        "customerName": entity.customer_name,
        "groupName": entity.group_name,
        "additionalInfo": Value::Object(additional),
    })
}
