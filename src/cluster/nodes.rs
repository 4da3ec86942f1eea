//! Membership: each gateway registers itself under a lease it renews (the heartbeat),
//! publishing what the cluster view shows about it. A member whose lease ends is dead:
//! its connection slots stop counting and it drops out of the view.

use serde::{Deserialize, Serialize};

/// One agent connected to a node, as the cluster view lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeAgent {
    pub client_id: String,
    pub group: String,
    pub sessions: usize,
}

/// What a node publishes about itself with every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The configured (or default) node id, as operators name it.
    pub node_id: String,
    /// `node_id` plus a boot id: a restarted node is a new member, so that it never
    /// inherits (or frees) the slots of its previous life by mistake.
    pub member: String,
    /// Seconds since the Unix epoch when this process started.
    pub started_at: u64,
    /// The agents connected to this node now.
    pub agents: Vec<NodeAgent>,
}

/// What a node reports about itself at each heartbeat (the gateway's registry).
pub trait NodeReport: Send + Sync {
    fn agents(&self) -> Vec<NodeAgent>;
}

/// A member name for this process: the node id and a random boot id.
pub fn member_name(node_id: &str) -> String {
    format!("{node_id}/{:016x}", rand::random::<u64>())
}
