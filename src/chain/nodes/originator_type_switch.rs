//! TbOriginatorTypeSwitchNode: routes a message by its originator's entity
//! type, with ThingsBoard's relation names (`Device`, `Asset`, ...).

use super::NodeOutput;
use crate::chain::Envelope;
use crate::msg::EntityType;

/// Every relation the node has in ThingsBoard (shardflow's originators are
/// devices, assets and the tenant).
pub const RELATIONS: &[&str] = &[
    "Device",
    "Asset",
    "Entity View",
    "Tenant",
    "Customer",
    "User",
    "Dashboard",
    "Rule chain",
    "Rule node",
    "Edge",
];

pub fn process(env: Envelope) -> NodeOutput {
    let relation = match env.msg.originator.entity_type {
        EntityType::Device => "Device",
        EntityType::Asset => "Asset",
        EntityType::Tenant => "Tenant",
    };
    NodeOutput::Now(vec![(relation.to_string(), env)])
}
