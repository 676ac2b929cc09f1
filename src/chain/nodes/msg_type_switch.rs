//! TbMsgTypeSwitchNode: routes a message by its type, using the relation
//! names ThingsBoard gives each message type (`Other` for custom types).

use super::NodeOutput;
use crate::chain::Envelope;
use crate::msg::switch_relation;

pub fn process(env: Envelope) -> NodeOutput {
    let relation = switch_relation(&env.msg.msg_type).to_string();
    NodeOutput::Now(vec![(relation, env)])
}
