//! The rule-engine message (ThingsBoard's TbMsg) and the entity ids it carries.
//!
//! This module is plain data shared by every other part of shardflow; it
//! depends on nothing else in the crate.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The kinds of entity a message can originate from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EntityType {
    Device,
    Asset,
    /// The one tenant everything belongs to: the originator of messages
    /// that are about no device (message counts, generated messages).
    Tenant,
}

impl EntityType {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityType::Device => "DEVICE",
            EntityType::Asset => "ASSET",
            EntityType::Tenant => "TENANT",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_uppercase().as_str() {
            "DEVICE" => Some(EntityType::Device),
            "ASSET" => Some(EntityType::Asset),
            "TENANT" => Some(EntityType::Tenant),
            _ => None,
        }
    }
}

/// An entity reference as ThingsBoard serialises it: `{entityType, id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EntityId {
    #[serde(rename = "entityType")]
    pub entity_type: EntityType,
    pub id: Uuid,
}

/// The id ThingsBoard shows for the tenant of a single-tenant setup; the
/// API's entities carry it as their `tenantId`.
pub const TENANT_ID: Uuid = uuid::uuid!("13814000-1dd2-11b2-8080-808080808080");

impl EntityId {
    pub fn tenant() -> EntityId {
        EntityId {
            entity_type: EntityType::Tenant,
            id: TENANT_ID,
        }
    }
}

impl fmt::Display for EntityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.entity_type.as_str(), self.id)
    }
}

/// ThingsBoard's message types with the relation name the message type
/// switch emits for each. Types whose relation is `Other` in ThingsBoard
/// have `None` here.
const MESSAGE_TYPES: &[(&str, Option<&str>)] = &[
    ("POST_ATTRIBUTES_REQUEST", Some("Post attributes")),
    ("POST_TELEMETRY_REQUEST", Some("Post telemetry")),
    ("TO_SERVER_RPC_REQUEST", Some("RPC Request from Device")),
    ("ACTIVITY_EVENT", Some("Activity Event")),
    ("INACTIVITY_EVENT", Some("Inactivity Event")),
    ("CONNECT_EVENT", Some("Connect Event")),
    ("DISCONNECT_EVENT", Some("Disconnect Event")),
    ("ENTITY_CREATED", Some("Entity Created")),
    ("ENTITY_UPDATED", Some("Entity Updated")),
    ("ENTITY_DELETED", Some("Entity Deleted")),
    ("ENTITY_ASSIGNED", Some("Entity Assigned")),
    ("ENTITY_UNASSIGNED", Some("Entity Unassigned")),
    ("ATTRIBUTES_UPDATED", Some("Attributes Updated")),
    ("ATTRIBUTES_DELETED", Some("Attributes Deleted")),
    ("ALARM", None),
    ("ALARM_ACK", Some("Alarm Acknowledged")),
    ("ALARM_CLEAR", Some("Alarm Cleared")),
    ("ALARM_DELETE", None),
    ("ALARM_ASSIGNED", Some("Alarm Assigned")),
    ("ALARM_UNASSIGNED", Some("Alarm Unassigned")),
    ("COMMENT_CREATED", Some("Comment Created")),
    ("COMMENT_UPDATED", Some("Comment Updated")),
    (
        "RPC_CALL_FROM_SERVER_TO_DEVICE",
        Some("RPC Request to Device"),
    ),
    (
        "ENTITY_ASSIGNED_FROM_TENANT",
        Some("Entity Assigned From Tenant"),
    ),
    (
        "ENTITY_ASSIGNED_TO_TENANT",
        Some("Entity Assigned To Tenant"),
    ),
    ("ENTITY_ASSIGNED_TO_EDGE", None),
    ("ENTITY_UNASSIGNED_FROM_EDGE", None),
    ("TIMESERIES_UPDATED", Some("Timeseries Updated")),
    ("TIMESERIES_DELETED", Some("Timeseries Deleted")),
    ("RPC_QUEUED", Some("RPC Queued")),
    ("RPC_SENT", Some("RPC Sent")),
    ("RPC_DELIVERED", Some("RPC Delivered")),
    ("RPC_SUCCESSFUL", Some("RPC Successful")),
    ("RPC_TIMEOUT", Some("RPC Timeout")),
    ("RPC_EXPIRED", Some("RPC Expired")),
    ("RPC_FAILED", Some("RPC Failed")),
    ("RPC_DELETED", Some("RPC Deleted")),
    ("RELATION_ADD_OR_UPDATE", Some("Relation Added or Updated")),
    ("RELATION_DELETED", Some("Relation Deleted")),
    ("RELATIONS_DELETED", Some("All Relations Deleted")),
    ("PROVISION_SUCCESS", None),
    ("PROVISION_FAILURE", None),
    ("SEND_EMAIL", None),
];

/// Relation names used by many nodes.
pub mod relation {
    pub const SUCCESS: &str = "Success";
    pub const FAILURE: &str = "Failure";
    pub const OTHER: &str = "Other";
}

pub const POST_TELEMETRY_REQUEST: &str = "POST_TELEMETRY_REQUEST";
pub const POST_ATTRIBUTES_REQUEST: &str = "POST_ATTRIBUTES_REQUEST";
pub const ENTITY_CREATED: &str = "ENTITY_CREATED";
pub const ATTRIBUTES_UPDATED: &str = "ATTRIBUTES_UPDATED";
pub const ATTRIBUTES_DELETED: &str = "ATTRIBUTES_DELETED";

/// The relation the message type switch emits for `msg_type`: the
/// ThingsBoard connection name, or `Other` for custom types.
pub fn switch_relation(msg_type: &str) -> &'static str {
    MESSAGE_TYPES
        .iter()
        .find(|(name, _)| *name == msg_type)
        .and_then(|(_, rel)| *rel)
        .unwrap_or(relation::OTHER)
}

/// Every relation name the message type switch can emit.
pub fn switch_relations() -> impl Iterator<Item = &'static str> {
    MESSAGE_TYPES
        .iter()
        .filter_map(|(_, rel)| *rel)
        .chain([relation::OTHER, relation::FAILURE])
}

/// ThingsBoard's message data type; shardflow produces JSON only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataType {
    #[serde(rename = "JSON")]
    Json,
    #[serde(rename = "TEXT")]
    Text,
    #[serde(rename = "BINARY")]
    Binary,
}

/// A rule-engine message: ThingsBoard's TbMsg.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TbMsg {
    pub id: Uuid,
    /// Milliseconds since the epoch.
    pub ts: i64,
    #[serde(rename = "type")]
    pub msg_type: String,
    pub originator: EntityId,
    pub metadata: BTreeMap<String, String>,
    #[serde(rename = "dataType")]
    pub data_type: DataType,
    /// The message body, a JSON text.
    pub data: String,
}

impl TbMsg {
    pub fn new(
        msg_type: &str,
        originator: EntityId,
        metadata: BTreeMap<String, String>,
        data: String,
        ts: i64,
    ) -> Self {
        TbMsg {
            id: message_id(),
            ts,
            msg_type: msg_type.to_string(),
            originator,
            metadata,
            data_type: DataType::Json,
            data,
        }
    }

    /// A copy with a fresh id, as ThingsBoard makes when a message is sent
    /// along several relations.
    pub fn copy(&self) -> Self {
        TbMsg {
            id: message_id(),
            ..self.clone()
        }
    }
}

/// A random (version 4) message id from the thread's RNG: message ids need
/// uniqueness, not secrecy, and a system call per message costs more than
/// the rest of making the message.
fn message_id() -> Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_relation_names_follow_thingsboard() {
        assert_eq!(switch_relation("POST_TELEMETRY_REQUEST"), "Post telemetry");
        assert_eq!(switch_relation("ATTRIBUTES_UPDATED"), "Attributes Updated");
        assert_eq!(switch_relation("ALARM"), "Other");
        assert_eq!(switch_relation("MY_CUSTOM_TYPE"), "Other");
    }
}
