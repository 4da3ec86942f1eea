//! Credential checks for proxy users and agents: one [`Authenticator`] interface that
//! every password check goes through (agent `auth`, HTTP proxy Basic, SOCKS5 RFC 1929),
//! and its backends:
//!
//! - [`Accounts`] (`static`): the accounts of the configuration, as before;
//! - [`file::FileBackend`] (`file`): a users file with bcrypt or argon2 hashes,
//!   reloaded when it changes;
//! - [`hook::HookBackend`] (`http`): a POST of JSON to a service of the operator's;
//! - [`ldap::LdapBackend`] (`ldap`): a bind as the user to an LDAP directory.
//!
//! Backends are chained in a declared order ([`Chain`], [`Order`]); remote answers are
//! cached when positive ([`Cached`]); each backend keeps its own [`BackendStats`].
//! An [`Authority`] turns the chain's verdict into the [`Identity`] of a listener's
//! user or of an agent. Lockouts are not here: the caller gates first (`limits`), so
//! a locked-out address never reaches a backend.

pub mod chain;
pub mod config;
pub mod file;
pub mod hash;
pub mod hook;
pub mod ldap;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use chain::{BackendStats, Cached, Chain, Metered, Order};

use crate::net::{credentials_match, Credentials};

/// An authenticated proxy user: who, and which agent group carries their connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: Option<String>,
    pub group: Arc<str>,
}

/// Who is asking: what the hook contract calls `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An agent's `auth` message.
    Agent,
    /// A proxy user (HTTP Basic or SOCKS5 RFC 1929).
    Proxy,
    /// A user of the policy API.
    Api,
}

/// One password check: the credentials, and where they came from.
#[derive(Clone, Copy)]
pub struct Attempt<'a> {
    pub kind: Kind,
    pub username: &'a str,
    pub password: &'a str,
    pub client_ip: Option<IpAddr>,
    /// An agent's `client_id`.
    pub client_id: Option<&'a str>,
    /// Which listener asked: `http`, `socks5`, `gateway` (agents), `api`.
    pub listener: &'a str,
}

impl std::fmt::Debug for Attempt<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("client_ip", &self.client_ip)
            .field("client_id", &self.client_id)
            .field("listener", &self.listener)
            .finish()
    }
}

/// A backend's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The credentials are good; `groups` (possibly none) are the user's groups, the
    /// first configured one deciding the tunnel group (proxy users) or the agent
    /// group (agents).
    Allow { groups: Vec<Arc<str>> },
    /// The backend knows the user and refuses them; `reason` (never a secret) goes to
    /// the access log.
    Deny { reason: Option<String> },
    /// The backend does not know this user: the next backend of the chain is asked.
    Unknown,
}

/// A backend that could not answer (down, timing out, answering nonsense). Never
/// cached, never counted toward a lockout: the user is told the backend is
/// unavailable (HTTP 503, SOCKS 0x01, agents `AUTH_FAILED`).
#[derive(Clone, Debug, thiserror::Error)]
#[error("authentication backend {backend:?} unavailable: {message}")]
pub struct BackendError {
    pub backend: Arc<str>,
    pub message: String,
}

impl BackendError {
    pub fn new(backend: &str, message: impl Into<String>) -> Self {
        BackendError {
            backend: Arc::from(backend),
            message: message.into(),
        }
    }
}

/// What [`Authenticator::check`] returns.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<Verdict, BackendError>> + Send + 'a>>;

/// The one interface every password check goes through. It is an async check
/// (`async fn check(&self, attempt) -> Result<Verdict, BackendError>`), written with a
/// boxed future so that backends of different kinds can be chained as trait objects.
pub trait Authenticator: Send + Sync {
    /// The backend's configured name (`static` for the configuration's accounts).
    fn name(&self) -> &str;
    fn check<'a>(&'a self, attempt: &'a Attempt<'a>) -> CheckFuture<'a>;
}

/// What a listener (or the agent server) makes of a chain's verdict.
#[derive(Debug)]
pub enum Outcome<T = Identity> {
    Allowed(T),
    /// Refused; the reason is a backend's, for the log.
    Denied(Option<String>),
    Unavailable(BackendError),
}

impl<T> Outcome<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Allowed(t) => Outcome::Allowed(f(t)),
            Outcome::Denied(r) => Outcome::Denied(r),
            Outcome::Unavailable(e) => Outcome::Unavailable(e),
        }
    }
}

/// Who may use one listener (or join as an agent): a chain of backends, and the groups
/// an allow may lead to. A listener whose only backend is `static` without accounts
/// is open: everyone reaches the default group.
///
/// A reload swaps the rules whole ([`Authority::replace`]); each check reads the rules
/// current when it starts (a wait-free load), so a listener holds one `Authority` for
/// its lifetime and never sees half of an old configuration and half of a new one.
pub struct Authority {
    rules: ArcSwap<Rules>,
    /// Agents: an allow without groups names the group by its username (the static
    /// accounts' rule: an agent's username is its group). A property of the role,
    /// which no reload changes.
    username_is_group: bool,
    /// Each authenticated user's hold on their live connections, by username; a
    /// reload that removes the user revokes it ([`Authority::revoke`]). Touched once
    /// per authentication, never per byte.
    holds: parking_lot::Mutex<std::collections::HashMap<String, crate::net::Revoke>>,
}

/// Holds kept before the table is swept of users with no live connection.
const HOLDS_SWEPT_AT: usize = 1024;

/// What a reload replaces.
struct Rules {
    chain: Chain,
    open: bool,
    default_group: Arc<str>,
    groups: Vec<Arc<str>>,
}

impl Rules {
    fn known(&self, group: &str) -> Option<Arc<str>> {
        if *self.default_group == *group {
            return Some(self.default_group.clone());
        }
        self.groups.iter().find(|g| ***g == *group).cloned()
    }
}

impl Authority {
    /// `groups` are the tunnel groups that exist besides `default_group`.
    pub fn new(chain: Chain, open: bool, default_group: Arc<str>, groups: Vec<Arc<str>>) -> Self {
        Authority {
            rules: ArcSwap::from_pointee(Rules {
                chain,
                open,
                default_group,
                groups,
            }),
            username_is_group: false,
            holds: Default::default(),
        }
    }

    /// The agents' authority: an allow without groups puts the agent in the group its
    /// username names, when there is one.
    pub fn for_agents(mut self) -> Self {
        self.username_is_group = true;
        self
    }

    /// A chain of the static accounts alone.
    pub fn of_accounts(accounts: Accounts, groups: Vec<Arc<str>>) -> Self {
        let open = accounts.is_open();
        let default = accounts.open_group.clone();
        Authority::new(
            Chain::new(vec![Arc::new(accounts)], Order::FirstAllow),
            open,
            default,
            groups,
        )
    }

    /// Takes `next`'s rules from the next check on; checks under way finish with the
    /// rules they started with.
    pub fn replace(&self, next: Authority) {
        self.rules.store(next.rules.into_inner());
    }

    pub fn is_open(&self) -> bool {
        self.rules.load().open
    }

    /// `user`'s hold on a connection being opened now: revoked when a reload removes
    /// them. Taken before the password check: a reload swaps the rules and then
    /// revokes, so a check racing it either meets the new rules or holds what is
    /// revoked.
    pub fn hold(&self, user: &str) -> crate::net::Revoke {
        let mut holds = self.holds.lock();
        if holds.len() >= HOLDS_SWEPT_AT && !holds.contains_key(user) {
            holds.retain(|_, h| h.is_held());
        }
        holds.entry(user.to_owned()).or_default().clone()
    }

    /// Whether the current rules ask the backend named `backend`.
    pub fn chains(&self, backend: &str) -> bool {
        self.rules.load().chain.names().contains(&backend)
    }

    /// Closes `user`'s live connections, with `reason` in their access lines; the
    /// next connection gets a new hold. Whether they had one.
    pub fn revoke(&self, user: &str, reason: &'static str) -> bool {
        let hold = self.holds.lock().remove(user);
        hold.map(|h| h.revoke(reason)).is_some()
    }

    /// The identity of an open listener's users.
    pub fn anonymous(&self) -> Identity {
        Identity {
            user: None,
            group: self.rules.load().default_group.clone(),
        }
    }

    /// Asks the chain, and turns an allow into the user's identity: the first of its
    /// groups that exists; none given → the default group (agents: the group their
    /// username names, else the default). Groups given, none of them configured →
    /// refused.
    pub async fn authenticate(&self, attempt: &Attempt<'_>) -> Outcome {
        let rules = self.rules.load_full();
        match rules.chain.check(attempt).await {
            Ok(Verdict::Allow { groups }) => {
                let group = if groups.is_empty() {
                    let by_name = self
                        .username_is_group
                        .then(|| rules.known(attempt.username))
                        .flatten();
                    Some(by_name.unwrap_or_else(|| rules.default_group.clone()))
                } else {
                    groups.iter().find_map(|g| rules.known(g))
                };
                match group {
                    Some(group) => Outcome::Allowed(Identity {
                        user: Some(attempt.username.to_owned()),
                        group,
                    }),
                    None => Outcome::Denied(Some(format!(
                        "none of the user's groups ({}) is a configured group",
                        groups
                            .iter()
                            .map(|g| g.as_ref())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))),
                }
            }
            Ok(Verdict::Deny { reason }) => Outcome::Denied(reason),
            Ok(Verdict::Unknown) => Outcome::Denied(None),
            Err(e) => Outcome::Unavailable(e),
        }
    }
}

/// Accounts, each bound to an agent group: the proxy users of one listener, or the
/// agents the gateway accepts (whose username then names their group). This is the
/// `static` backend.
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

    /// Whether some account has this username (for [`Verdict::Unknown`]).
    fn knows(&self, username: &str) -> bool {
        let mut known = false;
        for (creds, _) in &self.accounts {
            known |= crate::net::secret_eq(&creds.username, username);
        }
        known
    }
}

impl Authenticator for Accounts {
    fn name(&self) -> &str {
        "static"
    }

    fn check<'a>(&'a self, attempt: &'a Attempt<'a>) -> CheckFuture<'a> {
        let verdict = match self.authenticate(attempt.username, attempt.password) {
            Some(identity) => Verdict::Allow {
                groups: vec![identity.group],
            },
            None if self.knows(attempt.username) => Verdict::Deny { reason: None },
            None => Verdict::Unknown,
        };
        Box::pin(std::future::ready(Ok(verdict)))
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
    fn a_revoked_user_loses_its_live_holds_and_gets_a_new_one() {
        let users = Authority::of_accounts(Accounts::new(vec![], Arc::from("d")), vec![]);
        let (a1, a2, b) = (users.hold("alice"), users.hold("alice"), users.hold("bob"));
        assert!(a1 == a2 && a1 != b);
        assert!(users.revoke("alice", "removed"));
        assert!(a1.is_revoked() && a2.is_revoked() && !b.is_revoked());
        assert!(!users.hold("alice").is_revoked());
        assert!(!users.revoke("carol", "removed"), "never held");
    }

    #[test]
    fn holds_nobody_keeps_are_swept() {
        let users = Authority::of_accounts(Accounts::new(vec![], Arc::from("d")), vec![]);
        let kept = users.hold("kept");
        for i in 0..3 * HOLDS_SWEPT_AT {
            drop(users.hold(&format!("u{i}")));
        }
        assert!(users.holds.lock().len() <= HOLDS_SWEPT_AT + 1);
        assert!(users.holds.lock().get("kept") == Some(&kept));
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

    fn attempt<'a>(username: &'a str, password: &'a str) -> Attempt<'a> {
        Attempt {
            kind: Kind::Agent,
            username,
            password,
            client_ip: None,
            client_id: Some("a1"),
            listener: "gateway",
        }
    }

    #[tokio::test]
    async fn a_replaced_authority_checks_with_the_new_rules_and_keeps_its_role() {
        let office: Arc<str> = Arc::from("office");
        let authority = Authority::of_accounts(
            Accounts::new(
                vec![(creds("office", "old"), office.clone())],
                Arc::from("default"),
            ),
            vec![office.clone()],
        )
        .for_agents();
        assert!(matches!(
            authority.authenticate(&attempt("office", "old")).await,
            Outcome::Allowed(Identity { ref group, .. }) if **group == *"office"
        ));
        authority.replace(Authority::of_accounts(
            Accounts::new(
                vec![(creds("office", "new"), office.clone())],
                Arc::from("default"),
            ),
            vec![office],
        ));
        assert!(matches!(
            authority.authenticate(&attempt("office", "old")).await,
            Outcome::Denied(_)
        ));
        // Still the agents' authority: the username names the group.
        assert!(matches!(
            authority.authenticate(&attempt("office", "new")).await,
            Outcome::Allowed(Identity { ref group, .. }) if **group == *"office"
        ));
        assert!(!authority.is_open());
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
