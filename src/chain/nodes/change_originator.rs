//! TbChangeOriginatorNode: makes another entity the message's originator.
//! shardflow has devices, assets and one tenant, so the sources that make
//! sense are `TENANT` and `ENTITY` (a device or asset found by
//! `entityNamePattern`, with `${metadata}` and `$[data]` patterns). A name
//! that matches no entity goes to `Failure`. Customers, relations and
//! alarms do not exist in shardflow; those sources are rejected at load.

use serde_json::Value;

use super::template::substitute;
use super::{failure, success, NodeOutput};
use crate::chain::{Envelope, Services};
use crate::msg::{EntityId, EntityType};

#[derive(Debug, Clone)]
pub enum Config {
    Tenant,
    Entity {
        entity_type: EntityType,
        name_pattern: String,
    },
}

impl Config {
    pub fn parse(config: &Value) -> Result<Config, String> {
        let source = config
            .get("originatorSource")
            .and_then(Value::as_str)
            .ok_or("originatorSource is missing")?;
        match source {
            "TENANT" => Ok(Config::Tenant),
            "ENTITY" => {
                let entity_type = config
                    .get("entityType")
                    .and_then(Value::as_str)
                    .ok_or("entityType is missing (DEVICE or ASSET)")?;
                let entity_type = match EntityType::parse(entity_type) {
                    Some(t @ (EntityType::Device | EntityType::Asset)) => t,
                    _ => {
                        return Err(format!(
                            "entityType {entity_type:?} is not supported: shardflow has DEVICE and ASSET entities"
                        ))
                    }
                };
                let name_pattern = config
                    .get("entityNamePattern")
                    .and_then(Value::as_str)
                    .filter(|p| !p.trim().is_empty())
                    .ok_or("entityNamePattern is missing")?
                    .to_string();
                Ok(Config::Entity {
                    entity_type,
                    name_pattern,
                })
            }
            other => Err(format!(
                "originatorSource {other:?} is not supported: shardflow has no customers, relations or alarms (use ENTITY or TENANT)"
            )),
        }
    }
}

pub fn process(config: &Config, mut env: Envelope, services: &Services) -> NodeOutput {
    let originator = match config {
        Config::Tenant => EntityId::tenant(),
        Config::Entity {
            entity_type,
            name_pattern,
        } => {
            let name = substitute(name_pattern, &env.msg);
            match services.store.entity_by_name(*entity_type, &name) {
                Some(entity) => entity.id,
                None => {
                    let reason = format!("no {} named {name:?}", entity_type.as_str());
                    return NodeOutput::Now(vec![failure(env, reason)]);
                }
            }
        }
    };
    env.msg.originator = originator;
    NodeOutput::Now(vec![success(env)])
}
