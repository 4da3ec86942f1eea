//! Credential checks for proxy users and agents.

use std::sync::Arc;

use crate::net::{credentials_match, Credentials};

/// An authenticated proxy user: who, and which agent group carries their connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: Option<String>,
    pub group: Arc<str>,
}

/// Accounts, each bound to an agent group: the proxy users of one listener, or the
/// agents the gateway accepts (whose username then names their group).
///
/// A listener with no accounts at all is open: everyone reaches `open_group`.
#[derive(Debug)]
pub struct Accounts {
    accounts: Vec<(Credentials, Arc<str>)>,
    open_group: Arc<str>,
}

impl Accounts {
    pub fn new(accounts: Vec<(Credentials, Arc<str>)>, open_group: Arc<str>) -> Self {
        Accounts {
            accounts,
            open_group,
        }
    }

    pub fn is_open(&self) -> bool {
        self.accounts.is_empty()
    }

    /// The identity of an open listener's users.
    pub fn anonymous(&self) -> Identity {
        Identity {
            user: None,
            group: self.open_group.clone(),
        }
    }

    /// Checks every account, without stopping at the first match, so that timing does
    /// not tell which account (or which part) was close.
    pub fn authenticate(&self, username: &str, password: &str) -> Option<Identity> {
        let mut found = None;
        for (creds, group) in &self.accounts {
            if credentials_match(creds, username, password) && found.is_none() {
                found = Some(group.clone());
            }
        }
        found.map(|group| Identity {
            user: Some(username.to_owned()),
            group,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(u: &str, p: &str) -> Credentials {
        Credentials {
            username: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn accounts_lead_to_their_group() {
        let users = Accounts::new(
            vec![
                (creds("alice", "a"), Arc::from("default")),
                (creds("bob", "b"), Arc::from("office")),
            ],
            Arc::from("default"),
        );
        assert!(!users.is_open());
        assert_eq!(
            users.authenticate("bob", "b").unwrap().group.as_ref(),
            "office"
        );
        assert_eq!(
            users.authenticate("alice", "a").unwrap().group.as_ref(),
            "default"
        );
        assert_eq!(users.authenticate("bob", "a"), None);
        assert_eq!(users.authenticate("carol", "c"), None);
        let open = Accounts::new(vec![], Arc::from("default"));
        assert!(open.is_open());
        assert_eq!(open.anonymous().group.as_ref(), "default");
    }

    #[test]
    fn matches_only_both() {
        let c = Credentials {
            username: "u".into(),
            password: "p".into(),
        };
        assert!(credentials_match(&c, "u", "p"));
        assert!(!credentials_match(&c, "u", "q"));
        assert!(!credentials_match(&c, "x", "p"));
        assert!(!credentials_match(&c, "", ""));
    }
}
