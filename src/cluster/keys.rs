//! Key names. Every key of one cluster carries the same hash tag (`{prefix}`), so a
//! script touching several of them is valid on a Redis Cluster too (one slot), and
//! several clusters can share one Redis under different prefixes.

#[derive(Debug, Clone)]
pub struct Keys {
    tag: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            tag: format!("{{{prefix}}}"),
        }
    }

    /// Sorted set of live members, scored by when their lease ends (Redis time, ms).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.tag)
    }

    /// The prefix of a member's registration (JSON `NodeInfo`); append the member.
    pub fn node_prefix(&self) -> String {
        format!("{}:node:", self.tag)
    }

    /// Connections open per member under one cap (a hash member → count).
    pub fn slots(&self, scope: &str, key: &str) -> String {
        format!("{}:slots:{scope}:{key}", self.tag)
    }

    /// A token bucket for new connections.
    pub fn rate(&self, scope: &str, key: &str) -> String {
        format!("{}:rate:{scope}:{key}", self.tag)
    }

    /// Failed password checks of one address within the window.
    pub fn auth_failures(&self, scope: &str, ip: &str) -> String {
        format!("{}:authfail:{scope}:{ip}", self.tag)
    }

    /// Present while an address is locked out.
    pub fn auth_locked(&self, scope: &str, ip: &str) -> String {
        format!("{}:locked:{scope}:{ip}", self.tag)
    }

    /// A byte budget leased from by every node (a token bucket: tokens, ts).
    pub fn budget(&self, scope: &str, key: &str) -> String {
        format!("{}:budget:{scope}:{key}", self.tag)
    }

    /// Anything else a part above keeps in the store (the policy's sessions and
    /// quotas), under its own name.
    pub fn named(&self, name: &str) -> String {
        format!("{}:{name}", self.tag)
    }
}
