//! The manual's `/api/cmd` commands as plain Rust: the HTTP layer parses a `Cmd`, sets
//! `remoteAddr` from the connection, calls `Policy::cmd`, and answers 200 with the value
//! or 400 with `CmdError::to_json`.
//!
//! `user` and `isAdmin` exist in the manual's `Cmd` because the upstream filled them in
//! while routing; here they are ignored on input: who is asking comes from `secret` only.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::managers::dwn_cons_r::{human_bytes, DwnConsR};
use super::managers::session_ipm::SessionIpm;
use super::managers::Manager;
use super::persist::format_time;
use super::token::TokenError;
use super::{Policy, Request, Rules};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Cmd {
    pub cmd: String,
    pub user: String,
    pub manager: String,
    #[serde(rename = "remoteAddr")]
    pub remote_addr: String,
    pub secret: String,
    #[serde(rename = "isAdmin")]
    pub is_admin: bool,
    pub cred: Option<CmdCredentials>,
    pub string: String,
    pub uint64: u64,
}

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CmdCredentials {
    pub user: String,
    pub pass: String,
}

impl std::fmt::Debug for CmdCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmdCredentials")
            .field("user", &self.user)
            .field("pass", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdError {
    #[error(
        "unknown command {0:?} (discover, open, close, get, renew, check, getOther, set, show)"
    )]
    UnknownCommand(String),
    #[error("no manager named {0:?}")]
    UnknownManager(String),
    #[error("manager {manager:?} is a {kind}, which has no command {cmd:?}")]
    WrongManager {
        manager: String,
        kind: &'static str,
        cmd: String,
    },
    #[error("command {cmd:?} needs a manager: one of {choices}")]
    ManagerNeeded { cmd: String, choices: String },
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("remoteAddr {0:?} is not an IP address")]
    BadRemoteAddr(String),
    #[error("wrong user or password")]
    BadCredentials,
    #[error("token does not match an open session (closed, replaced or renewed): log in again")]
    InvalidToken,
    #[error("invalid token: {0}")]
    BadToken(#[from] TokenError),
    #[error("token expired: log in again (renew before it expires to keep it)")]
    TokenExpired,
    #[error("only administrators may do this")]
    NotAdmin,
    #[error("the cluster store is unreachable and this gateway refuses to decide without it; try again later")]
    StoreUnavailable,
    #[error("the command failed unexpectedly")]
    Internal,
}

impl CmdError {
    pub fn code(&self) -> &'static str {
        match self {
            CmdError::UnknownCommand(_) => "unknown_command",
            CmdError::UnknownManager(_) => "unknown_manager",
            CmdError::WrongManager { .. } => "wrong_manager",
            CmdError::ManagerNeeded { .. } => "manager_needed",
            CmdError::Missing(_) => "missing_field",
            CmdError::BadRemoteAddr(_) => "bad_remote_addr",
            CmdError::BadCredentials => "bad_credentials",
            CmdError::InvalidToken | CmdError::BadToken(_) => "invalid_token",
            CmdError::TokenExpired => "token_expired",
            CmdError::NotAdmin => "not_admin",
            CmdError::StoreUnavailable => "store_unavailable",
            CmdError::Internal => "internal",
        }
    }

    /// The upstream answers every failed command with 400; a store outage or a
    /// failure of ours is no fault of the request.
    pub fn http_status(&self) -> u16 {
        match self {
            CmdError::StoreUnavailable => 503,
            CmdError::Internal => 500,
            _ => 400,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({ "error": self.to_string(), "code": self.code() })
    }
}

#[derive(Debug, Serialize)]
pub struct MatchType {
    #[serde(rename = "match")]
    pub matched: bool,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[derive(Debug, Serialize)]
pub struct DiscoverRes {
    #[serde(rename = "matchMng")]
    pub match_mng: BTreeMap<String, MatchType>,
    /// `"true"`, `"false"`, or the reduced predicate when a name has no manager.
    pub result: String,
}

#[derive(Debug, Serialize)]
pub struct UserInfo {
    pub quota: String,
    pub groups: Vec<String>,
    pub name: String,
    #[serde(rename = "userName")]
    pub user_name: String,
    pub consumption: String,
    #[serde(rename = "bytesQuota")]
    pub bytes_quota: u64,
    #[serde(rename = "bytesCons")]
    pub bytes_cons: u64,
}

pub(crate) fn parse_addr(s: &str) -> Result<IpAddr, CmdError> {
    s.parse::<IpAddr>()
        .or_else(|_| s.parse::<SocketAddr>().map(|a| a.ip()))
        .map_err(|_| CmdError::BadRemoteAddr(s.to_string()))
}

fn to_value(v: impl Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

impl Policy {
    /// `cmd` for the API: off the async workers (`open` verifies a password hash), and
    /// against the cluster store when there is one.
    pub async fn cmd_async(self: &Arc<Self>, cmd: Cmd) -> Result<Value, CmdError> {
        if let Some(shared) = self.shared.clone() {
            return shared.cmd(self, cmd).await;
        }
        let p = self.clone();
        tokio::task::spawn_blocking(move || p.cmd(cmd))
            .await
            .unwrap_or(Err(CmdError::Internal))
    }

    pub fn cmd(&self, cmd: Cmd) -> Result<Value, CmdError> {
        if cmd.cmd == "discover" {
            return self.discover(&cmd).map(to_value);
        }
        let rules = self.rules();
        let manager = rules.route(&cmd)?;
        let session_cmd = matches!(cmd.cmd.as_str(), "open" | "close" | "renew" | "check");
        let quota_cmd = matches!(cmd.cmd.as_str(), "getOther" | "set" | "show");
        match manager {
            Manager::Session(s) if session_cmd || cmd.cmd == "get" => {
                self.session_cmd(&rules, s, &cmd)
            }
            Manager::DwnConsR(d) if quota_cmd || cmd.cmd == "get" => {
                self.quota_cmd(&rules, d, &cmd)
            }
            other => Err(CmdError::WrongManager {
                manager: cmd.manager.clone(),
                kind: other.kind(),
                cmd: cmd.cmd.clone(),
            }),
        }
    }

    /// The session or quota manager a write command is for, in the rules running now.
    pub(crate) fn route(&self, cmd: &Cmd) -> Result<Routed, CmdError> {
        Ok(match self.rules().route(cmd)? {
            Manager::Session(s) => Routed::Session(s.clone()),
            Manager::DwnConsR(d) => Routed::DwnConsR(d.clone()),
            _ => Routed::Other,
        })
    }
}

/// What [`Policy::route`] found: the managers a command writes through, owned (a reload
/// may swap the rules while the command runs).
pub(crate) enum Routed {
    Session(Arc<SessionIpm>),
    DwnConsR(Arc<DwnConsR>),
    Other,
}

impl Rules {
    /// The manager a command (other than `discover`) is for.
    fn route(&self, cmd: &Cmd) -> Result<&Manager, CmdError> {
        let session_cmd = matches!(cmd.cmd.as_str(), "open" | "close" | "renew" | "check");
        let quota_cmd = matches!(cmd.cmd.as_str(), "getOther" | "set" | "show");
        if !(session_cmd || quota_cmd || cmd.cmd == "get") {
            return Err(CmdError::UnknownCommand(cmd.cmd.clone()));
        }
        let manager = if cmd.manager.is_empty() {
            let kind = if session_cmd {
                Some("sessionIPM")
            } else if quota_cmd {
                Some("dwnConsR")
            } else {
                None
            };
            self.only_manager_of(&cmd.cmd, kind)?
        } else {
            self.manager(&cmd.manager)
                .map(|(_, m)| m)
                .ok_or_else(|| CmdError::UnknownManager(cmd.manager.clone()))?
        };
        Ok(manager)
    }

    /// Lets clients omit `manager` when only one could answer.
    fn only_manager_of(&self, cmd: &str, kind: Option<&str>) -> Result<&Manager, CmdError> {
        let fits = |m: &&Manager| match kind {
            Some(k) => m.kind() == k,
            None => matches!(m, Manager::Session(_) | Manager::DwnConsR(_)),
        };
        let candidates: Vec<usize> = (0..self.managers.len())
            .filter(|&i| fits(&&self.managers[i]))
            .collect();
        match candidates.as_slice() {
            [one] => Ok(&self.managers[*one]),
            many => Err(CmdError::ManagerNeeded {
                cmd: cmd.to_string(),
                choices: if many.is_empty() {
                    "(none configured)".to_string()
                } else {
                    many.iter()
                        .map(|&i| format!("{:?}", &*self.names[i]))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }),
        }
    }
}

impl Policy {
    fn discover(&self, cmd: &Cmd) -> Result<DiscoverRes, CmdError> {
        let ip = parse_addr(&cmd.remote_addr)?;
        let (host, port) = match cmd.string.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().unwrap_or(0)),
            None => (cmd.string.as_str(), 0),
        };
        let d = self.decide(&Request {
            client_ip: ip,
            user: None,
            host,
            port,
            now: self.clock.now(),
        });
        let rules = self.rules();
        let match_mng = d
            .consulted
            .iter()
            .filter_map(|(name, v)| {
                let (_, m) = rules.manager(name)?;
                Some((
                    name.to_string(),
                    MatchType {
                        matched: *v,
                        kind: m.kind(),
                    },
                ))
            })
            .collect();
        let result = match d.reduced {
            Some(r) => r,
            None => d.allow.to_string(),
        };
        Ok(DiscoverRes { match_mng, result })
    }

    /// The user behind a token, from whichever session manager issued it.
    fn token_user(&self, rules: &Rules, secret: &str) -> Result<String, CmdError> {
        if secret.is_empty() {
            return Err(CmdError::Missing("secret"));
        }
        let now = self.clock.now();
        let mut last = CmdError::InvalidToken;
        for s in &rules.sessions {
            match s.verify(secret, now, &*self.codec) {
                Ok(user) => return Ok(user),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn session_cmd(
        &self,
        rules: &Rules,
        s: &Arc<SessionIpm>,
        cmd: &Cmd,
    ) -> Result<Value, CmdError> {
        let now = self.clock.now();
        let codec = &*self.codec;
        match cmd.cmd.as_str() {
            "open" => {
                let cred = cmd.cred.as_ref().ok_or(CmdError::Missing("cred"))?;
                let ip = parse_addr(&cmd.remote_addr)?;
                s.open(&cred.user, &cred.pass, ip, now, codec)
                    .map(Value::String)
            }
            "close" => s.close(&cmd.secret, now, codec).map(|_| Value::Null),
            "renew" => s.renew(&cmd.secret, now, codec).map(Value::String),
            "check" => s.verify(&cmd.secret, now, codec).map(|_| Value::Null),
            _ => {
                // get: everyone's sessions for an admin, one's own otherwise.
                let user = s.verify(&cmd.secret, now, codec)?;
                let mut all = s.sessions();
                if !rules.is_admin(&user) {
                    all.retain(|_, u| *u == user);
                }
                Ok(to_value(all))
            }
        }
    }

    fn quota_cmd(&self, rules: &Rules, d: &Arc<DwnConsR>, cmd: &Cmd) -> Result<Value, CmdError> {
        let now = self.clock.now();
        match cmd.cmd.as_str() {
            "get" => {
                let user = self.token_user(rules, &cmd.secret)?;
                Ok(to_value(self.user_info(d, &user)))
            }
            "getOther" | "set" => {
                let caller = self.token_user(rules, &cmd.secret)?;
                if !rules.is_admin(&caller) {
                    return Err(CmdError::NotAdmin);
                }
                if cmd.string.is_empty() {
                    return Err(CmdError::Missing("string (the user)"));
                }
                if cmd.cmd == "set" {
                    d.set_consumption(&cmd.string, cmd.uint64, now);
                    return Ok(Value::Null);
                }
                Ok(to_value(self.user_info(d, &cmd.string)))
            }
            _ => {
                // show: the configuration for anyone, consumptions only for an admin.
                d.maybe_reset(now);
                let admin = !cmd.secret.is_empty()
                    && self
                        .token_user(rules, &cmd.secret)
                        .is_ok_and(|u| rules.is_admin(&u));
                let mut v = json!({
                    "name": d.name(),
                    "userDBN": d.user_db().name(),
                    "resetCycle": format!("{:?}", d.cycle()),
                    "groupQuota": d.group_quota().iter().map(|(g, q)| (g.clone(), human_bytes(*q))).collect::<BTreeMap<_, _>>(),
                    "lastReset": format_time(d.last_reset()),
                });
                if admin {
                    v["consumptions"] = to_value(d.consumptions());
                }
                Ok(v)
            }
        }
    }

    fn user_info(&self, d: &DwnConsR, user: &str) -> UserInfo {
        let h = d.handle(user, self.clock.now());
        UserInfo {
            quota: human_bytes(h.quota()),
            groups: d.user_db().groups(user).to_vec(),
            name: user.to_string(),
            user_name: user.to_string(),
            consumption: human_bytes(h.used()),
            bytes_quota: h.quota(),
            bytes_cons: h.used(),
        }
    }
}
