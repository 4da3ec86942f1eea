//! `sessionIPM`: requests from an address where a user opened a session.
//!
//! One session per user: opening at a new address closes the old one. One user per
//! address: a second user opening at an address takes it over (the upstream keeps an
//! address → user dictionary). Sessions last until closed or replaced; the token that
//! proves one expires after `jwtExpiration` and is renewed with `renew`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use super::user_db::UserDb;
use crate::net::secret_eq;
use crate::policy::cmd::CmdError;
use crate::policy::error::PolicyConfigError;
use crate::policy::persist::{read_json, write_json};
use crate::policy::token::{new_nonce, Claims, TokenCodec};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    pub ip: IpAddr,
    pub(crate) nonce: String,
    /// Unix seconds after which the token must be renewed.
    pub expires: u64,
}

#[derive(Default)]
struct Table {
    by_user: HashMap<String, Session>,
    by_ip: HashMap<IpAddr, Arc<str>>,
}

#[derive(Serialize, Deserialize)]
struct SessionsFile {
    sessions: Vec<Session>,
}

pub struct SessionIpm {
    name: String,
    user_db: Arc<UserDb>,
    expiration: Duration,
    /// Shared with the same-named manager a reload replaces this one with, so open
    /// sessions (and a login racing the reload) survive it.
    table: Arc<RwLock<Table>>,
    state_file: Option<PathBuf>,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SessionIpm {
    pub fn new(
        name: &str,
        user_db: Arc<UserDb>,
        expiration: Duration,
        state_dir: Option<&Path>,
    ) -> Result<SessionIpm, PolicyConfigError> {
        let state_file = state_dir.map(|d| d.join(format!("{name}.sessions.json")));
        let mut table = Table::default();
        if let Some(path) = &state_file {
            if let Some(f) = read_json::<SessionsFile>(path)? {
                for s in f.sessions {
                    table.by_ip.insert(s.ip, Arc::from(s.user.as_str()));
                    table.by_user.insert(s.user.clone(), s);
                }
            }
        }
        Ok(SessionIpm {
            name: name.to_string(),
            user_db,
            expiration,
            table: Arc::new(RwLock::new(table)),
            state_file,
        })
    }

    /// A reload's replacement for `self`: the new configuration, the same open sessions
    /// (the state file is not read again: memory is newer).
    pub fn reconfigured(
        &self,
        user_db: Arc<UserDb>,
        expiration: Duration,
        state_dir: Option<&Path>,
    ) -> SessionIpm {
        SessionIpm {
            name: self.name.clone(),
            user_db,
            expiration,
            table: self.table.clone(),
            state_file: state_dir.map(|d| d.join(format!("{}.sessions.json", self.name))),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The hot path: one read lock and an `Arc` clone.
    pub fn user_at(&self, ip: IpAddr) -> Option<Arc<str>> {
        self.table.read().by_ip.get(&ip).cloned()
    }

    pub fn open(
        &self,
        user: &str,
        pass: &str,
        ip: IpAddr,
        now: SystemTime,
        codec: &dyn TokenCodec,
    ) -> Result<String, CmdError> {
        if !self.authenticate(user, pass) {
            return Err(CmdError::BadCredentials);
        }
        let session = self.new_session(user, ip, now);
        let token = codec.encode(&claims(&session));
        self.apply_open(session);
        Ok(token)
    }

    pub(crate) fn authenticate(&self, user: &str, pass: &str) -> bool {
        self.user_db.authenticate(user, pass)
    }

    /// A fresh session of `user` at `ip` (not in the table yet).
    pub(crate) fn new_session(&self, user: &str, ip: IpAddr, now: SystemTime) -> Session {
        Session {
            user: user.to_string(),
            ip,
            nonce: new_nonce(),
            expires: unix_secs(now).saturating_add(self.expiration.as_secs()),
        }
    }

    /// `s` with a new nonce and expiry.
    pub(crate) fn renewed(&self, s: &Session, now: SystemTime) -> Session {
        Session {
            nonce: new_nonce(),
            expires: unix_secs(now).saturating_add(self.expiration.as_secs()),
            ..s.clone()
        }
    }

    pub(crate) fn token(s: &Session, codec: &dyn TokenCodec) -> String {
        codec.encode(&claims(s))
    }

    /// Makes `session` its user's only session and its address's only user.
    pub(crate) fn apply_open(&self, session: Session) {
        let user = session.user.as_str();
        let mut t = self.table.write();
        if let Some(old) = t.by_user.remove(user) {
            if t.by_ip.get(&old.ip).is_some_and(|u| &**u == user) {
                t.by_ip.remove(&old.ip);
            }
        }
        if let Some(other) = t.by_ip.insert(session.ip, Arc::from(user)) {
            if &*other != user {
                t.by_user.remove(&*other);
            }
        }
        t.by_user.insert(session.user.clone(), session);
    }

    /// Ends `user`'s session if it is still the one with `nonce`.
    pub(crate) fn apply_close(&self, user: &str, nonce: &str) {
        let mut t = self.table.write();
        if t.by_user.get(user).is_some_and(|s| s.nonce == nonce) {
            if let Some(old) = t.by_user.remove(user) {
                if t.by_ip.get(&old.ip).is_some_and(|u| &**u == user) {
                    t.by_ip.remove(&old.ip);
                }
            }
        }
    }

    /// Replaces the whole table (with the store's, in a cluster).
    pub(crate) fn replace_all(&self, sessions: impl IntoIterator<Item = Session>) {
        let mut table = Table::default();
        for s in sessions {
            // One user per address even if the source disagrees: the last one wins.
            if let Some(other) = table.by_ip.insert(s.ip, Arc::from(s.user.as_str())) {
                table.by_user.remove(&*other);
            }
            table.by_user.insert(s.user.clone(), s);
        }
        *self.table.write() = table;
    }

    /// The session a token proves, checked as `verify` does.
    pub(crate) fn current(&self, c: &Claims, now: SystemTime) -> Result<Session, CmdError> {
        let t = self.table.read();
        Self::check(&t, c, now)?;
        t.by_user
            .get(&c.user)
            .cloned()
            .ok_or(CmdError::InvalidToken)
    }

    /// The user a live token belongs to.
    pub fn verify(
        &self,
        token: &str,
        now: SystemTime,
        codec: &dyn TokenCodec,
    ) -> Result<String, CmdError> {
        let c = codec.decode(token)?;
        Self::check(&self.table.read(), &c, now)?;
        Ok(c.user)
    }

    /// The token's session is the current one of its user, and not expired.
    fn check(t: &Table, c: &Claims, now: SystemTime) -> Result<(), CmdError> {
        let s = t.by_user.get(&c.user).ok_or(CmdError::InvalidToken)?;
        if !secret_eq(&s.nonce, &c.nonce) {
            return Err(CmdError::InvalidToken);
        }
        if unix_secs(now) >= s.expires {
            return Err(CmdError::TokenExpired);
        }
        Ok(())
    }

    pub fn close(
        &self,
        token: &str,
        now: SystemTime,
        codec: &dyn TokenCodec,
    ) -> Result<(), CmdError> {
        let claims = codec.decode(token)?;
        let mut t = self.table.write();
        // Checked under the write lock: a session reopened meanwhile is not this token's.
        Self::check(&t, &claims, now)?;
        if let Some(old) = t.by_user.remove(&claims.user) {
            t.by_ip.remove(&old.ip);
        }
        Ok(())
    }

    pub fn renew(
        &self,
        token: &str,
        now: SystemTime,
        codec: &dyn TokenCodec,
    ) -> Result<String, CmdError> {
        let presented = codec.decode(token)?;
        let mut t = self.table.write();
        Self::check(&t, &presented, now)?;
        let s = t
            .by_user
            .get_mut(&presented.user)
            .ok_or(CmdError::InvalidToken)?;
        s.nonce = new_nonce();
        s.expires = unix_secs(now).saturating_add(self.expiration.as_secs());
        Ok(codec.encode(&claims(s)))
    }

    /// Address → user, for every open session.
    pub fn sessions(&self) -> BTreeMap<String, String> {
        let t = self.table.read();
        t.by_user
            .values()
            .map(|s| (s.ip.to_string(), s.user.clone()))
            .collect()
    }

    pub fn persist(&self) -> std::io::Result<()> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let sessions = self.table.read().by_user.values().cloned().collect();
        write_json(path, &SessionsFile { sessions })
    }
}

fn claims(s: &Session) -> Claims {
    Claims {
        user: s.user.clone(),
        nonce: s.nonce.clone(),
        expires: s.expires,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::config::MapDbConf;
    use crate::policy::token::OpaqueTokens;

    fn db() -> Arc<UserDb> {
        let c: MapDbConf =
            toml::from_str("name = \"db\"\nuserPass = { alice = \"a\", bob = \"b\" }").unwrap();
        Arc::new(UserDb::from_conf("managers.toml", &c).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_session_per_user_and_one_user_per_address() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let m = SessionIpm::new("s", db(), Duration::from_secs(60), None).unwrap();
        assert_eq!(
            m.open("alice", "x", ip("10.0.0.1"), now, &OpaqueTokens),
            Err(CmdError::BadCredentials)
        );
        let t1 = m
            .open("alice", "a", ip("10.0.0.1"), now, &OpaqueTokens)
            .unwrap();
        assert_eq!(m.user_at(ip("10.0.0.1")).as_deref(), Some("alice"));
        // A new address closes the old session and invalidates its token.
        let t2 = m
            .open("alice", "a", ip("10.0.0.2"), now, &OpaqueTokens)
            .unwrap();
        assert_eq!(m.user_at(ip("10.0.0.1")), None);
        assert_eq!(m.user_at(ip("10.0.0.2")).as_deref(), Some("alice"));
        assert_eq!(
            m.verify(&t1, now, &OpaqueTokens),
            Err(CmdError::InvalidToken)
        );
        assert_eq!(m.verify(&t2, now, &OpaqueTokens).unwrap(), "alice");
        // Bob takes the address over.
        m.open("bob", "b", ip("10.0.0.2"), now, &OpaqueTokens)
            .unwrap();
        assert_eq!(m.user_at(ip("10.0.0.2")).as_deref(), Some("bob"));
        assert_eq!(
            m.verify(&t2, now, &OpaqueTokens),
            Err(CmdError::InvalidToken)
        );
        assert_eq!(m.sessions().len(), 1);
    }

    #[test]
    fn tokens_expire_renew_and_close() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = now + Duration::from_secs(61);
        let m = SessionIpm::new("s", db(), Duration::from_secs(60), None).unwrap();
        let t = m
            .open("alice", "a", ip("10.0.0.1"), now, &OpaqueTokens)
            .unwrap();
        let renewed = m.renew(&t, now, &OpaqueTokens).unwrap();
        assert_eq!(
            m.verify(&t, now, &OpaqueTokens),
            Err(CmdError::InvalidToken)
        );
        assert_eq!(
            m.verify(&renewed, later, &OpaqueTokens),
            Err(CmdError::TokenExpired)
        );
        // An expired token does not end the session itself.
        assert_eq!(m.user_at(ip("10.0.0.1")).as_deref(), Some("alice"));
        m.close(&renewed, now, &OpaqueTokens).unwrap();
        assert_eq!(m.user_at(ip("10.0.0.1")), None);
        assert!(matches!(
            m.verify("garbage", now, &OpaqueTokens),
            Err(CmdError::BadToken(_))
        ));
    }

    #[test]
    fn sessions_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let m = SessionIpm::new("s", db(), Duration::from_secs(60), Some(dir.path())).unwrap();
        let t = m
            .open("alice", "a", ip("10.0.0.1"), now, &OpaqueTokens)
            .unwrap();
        m.persist().unwrap();
        let m2 = SessionIpm::new("s", db(), Duration::from_secs(60), Some(dir.path())).unwrap();
        assert_eq!(m2.user_at(ip("10.0.0.1")).as_deref(), Some("alice"));
        assert_eq!(m2.verify(&t, now, &OpaqueTokens).unwrap(), "alice");
    }
}
