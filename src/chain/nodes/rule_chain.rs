//! TbRuleChainInputNode ("rule chain"): hands the message to another chain
//! (`ruleChainId`: the chain's export id, its file name without `.json`,
//! or its name) of the message's own rule set. When the message reaches an
//! output node there, it comes back here and leaves by the relation named
//! after that output node. A message that ends inside the called chain
//! ends there.

use std::sync::Arc;

use serde_json::Value;

use super::{failure, NodeCtx, NodeOutput};
use crate::chain::{Envelope, Frame};

#[derive(Debug, Clone)]
pub struct Config {
    pub target: String,
}

impl Config {
    pub fn parse(config: &Value) -> Result<Config, String> {
        let target = config
            .get("ruleChainId")
            .and_then(super::super::loader::id_text)
            .ok_or("ruleChainId is missing")?;
        Ok(Config { target })
    }
}

pub fn process(config: &Config, mut env: Envelope, ctx: &NodeCtx<'_>) -> NodeOutput {
    let set = env.set.clone();
    let Some(chain) = set.chain(&config.target) else {
        let reason = format!("rule chain {:?} is not loaded", config.target);
        return NodeOutput::Now(vec![failure(env, reason)]);
    };
    env.frames = Some(Arc::new(Frame {
        caller: ctx.addr.clone(),
        parent: env.frames.take(),
    }));
    chain.enter(env);
    NodeOutput::Now(Vec::new())
}
