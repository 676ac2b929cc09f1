//! TbRuleChainOutputNode: sends the message back to the rule chain node
//! that called this chain, which routes it by this node's name. In a chain
//! nobody called, the message is done here.

use super::{NodeCtx, NodeOutput};
use crate::chain::{Envelope, Returned};

pub fn process(mut env: Envelope, ctx: &NodeCtx<'_>) -> NodeOutput {
    if let Some(frame) = env.frames.take() {
        env.frames = frame.parent.clone();
        frame.caller.do_send(Returned {
            relation: ctx.info.name.clone(),
            env,
        });
    }
    NodeOutput::Now(Vec::new())
}
