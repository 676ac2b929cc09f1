//! TbMsgDeleteAttributesNode: deletes the originator's attributes of the
//! configured scope (`keys`, with `${metadata}` and `$[data]` patterns),
//! then emits Success once committed. With
//! `sendAttributesDeletedNotification`, an ATTRIBUTES_DELETED message
//! (`{"attributes": [...]}`, metadata `scope`) also enters the root chain
//! of the message's rule set, as part of the same record.

use serde_json::{json, Value};

use super::template::substitute;
use super::{failure, flag, store_and_emit, string_list, success, NodeCtx, NodeOutput};
use crate::chain::Envelope;
use crate::msg::TbMsg;
use crate::store::{Scope, Write};

#[derive(Debug, Clone)]
pub struct Config {
    pub scope: Scope,
    pub keys: Vec<String>,
    pub notify: bool,
}

impl Config {
    pub fn parse(config: &Value) -> Result<Config, String> {
        let scope = match config.get("scope").and_then(Value::as_str) {
            None => return Err("scope is missing".into()),
            Some(text) => Scope::parse(text).ok_or_else(|| {
                format!("scope {text:?} is not one of CLIENT_SCOPE, SERVER_SCOPE, SHARED_SCOPE")
            })?,
        };
        let keys = string_list(config, "keys")?;
        if keys.is_empty() {
            return Err("keys is empty: nothing to delete".into());
        }
        Ok(Config {
            scope,
            keys,
            notify: flag(config, "sendAttributesDeletedNotification", false)?,
        })
    }
}

pub fn process(config: &Config, env: Envelope, ctx: &NodeCtx<'_>) -> NodeOutput {
    let keys: Vec<String> = config
        .keys
        .iter()
        .map(|k| substitute(k, &env.msg))
        .filter(|k| !k.trim().is_empty())
        .collect();
    let write = Write::DeleteAttributes {
        entity: env.msg.originator,
        scope: config.scope,
        keys: keys.clone(),
    };
    if !config.notify {
        return store_and_emit(vec![write], env, ctx, "attribute deletion");
    }
    let store = ctx.services.store.clone();
    let scope = config.scope;
    NodeOutput::Later(Box::pin(async move {
        if let Err(e) = store.write(vec![write], Some(env.ticket.clone())).await {
            return vec![failure(env, format!("attributes not deleted: {e}"))];
        }
        let mut metadata = env.msg.metadata.clone();
        metadata.insert("scope".into(), scope.as_str().into());
        let notice = TbMsg::new(
            crate::msg::ATTRIBUTES_DELETED,
            env.msg.originator,
            metadata,
            json!({ "attributes": keys }).to_string(),
            crate::msg::now_millis(),
        );
        env.set.submit(notice, env.ticket.clone());
        vec![success(env)]
    }))
}
