//! From `ManagersConf` to a ready `Policy`: every value checked, every name resolved once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use super::config::ManagersConf;
use super::error::{At, PolicyConfigError};
use super::managers::dwn_cons_r::{DwnConsR, FlushSignal};
use super::managers::egress::{net_iface_from_conf, parent_proxy_from_conf};
use super::managers::group_ipm::GroupIpm;
use super::managers::host_matcher::HostMatcher;
use super::managers::range_ipm::RangeIpm;
use super::managers::session_ipm::SessionIpm;
use super::managers::time_span::TimeSpan;
use super::managers::user_db::UserDb;
use super::managers::Manager;
use super::rule::{is_ident_continue, is_ident_start, Rule};
use super::shared::Shared;
use super::{Policy, PolicyOptions, Rules};

/// The upstream's default token lifetime is not documented; a working day is a usable one.
const DEFAULT_JWT_EXPIRATION: Duration = Duration::from_secs(24 * 3600);

struct Builder<'a> {
    file: &'a str,
    map_db: Option<Arc<UserDb>>,
    ad_db: Option<Arc<UserDb>>,
    names: Vec<Arc<str>>,
    managers: Vec<Manager>,
    by_name: HashMap<String, usize>,
    settings: Vec<u64>,
}

/// A section's settings, to tell a reload's changed managers from the unchanged (a
/// hash: the sections can hold passwords, which need not be kept twice).
pub(super) fn fingerprint(conf: &dyn std::fmt::Debug) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{conf:?}").hash(&mut h);
    h.finish()
}

impl Builder<'_> {
    fn user_db(&self, at: &At, key: &str, name: &str) -> Result<Arc<UserDb>, PolicyConfigError> {
        match &self.map_db {
            Some(db) if db.name() == name => return Ok(db.clone()),
            _ => {}
        }
        match &self.ad_db {
            Some(db) if db.name() == name => Ok(db.clone()),
            _ => Err(at.err(key, format!("no [mapDB] or [adDB] named {name:?}"))),
        }
    }

    fn add(
        &mut self,
        at: &At,
        conf: &dyn std::fmt::Debug,
        m: Manager,
    ) -> Result<(), PolicyConfigError> {
        let name = at.name;
        let mut chars = name.chars();
        let valid = chars.next().is_some_and(is_ident_start) && chars.all(is_ident_continue);
        if !valid || name == "true" || name == "false" {
            return Err(at.err("name", "must be a rule identifier (a letter or _, then letters, digits, _ or -) other than true/false"));
        }
        if self.by_name.contains_key(name) {
            return Err(at.err("name", "another manager has this name"));
        }
        self.by_name.insert(name.to_string(), self.managers.len());
        self.names.push(Arc::from(name));
        self.managers.push(m);
        self.settings.push(fingerprint(conf));
        Ok(())
    }
}

pub fn build(conf: ManagersConf, opts: PolicyOptions) -> Result<Policy, PolicyConfigError> {
    let file = opts.file_label.as_str();
    let shared = opts
        .cluster
        .clone()
        .map(|c| Arc::new(Shared::new(c, opts.shared_jwt.clone())));
    // In a cluster the store holds sessions and consumptions, not the files.
    let state_dir = match shared {
        Some(_) => None,
        None => opts.state_dir.as_deref(),
    };
    if let Some(dir) = state_dir {
        std::fs::create_dir_all(dir).map_err(|e| PolicyConfigError::State {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    let state_dir = state_dir.map(|d| d.to_path_buf());
    let from = From {
        file,
        state_dir: state_dir.as_deref(),
        now: opts.clock.now(),
        flush: shared.as_ref().map(|s| s.flush.clone()),
        previous: None,
    };
    let rules = build_rules(conf, &from)?;
    Ok(Policy {
        rules: ArcSwap::from_pointee(rules),
        codec: opts.codec,
        clock: opts.clock,
        shared,
        state_dir,
    })
}

/// What a set of rules is built against: the file's name for errors, where state lives,
/// and on a reload the rules it replaces.
pub(super) struct From<'a> {
    pub file: &'a str,
    pub state_dir: Option<&'a Path>,
    pub now: SystemTime,
    pub flush: Option<Arc<FlushSignal>>,
    /// A reload's running rules: same-named `sessionIPM` and `dwnConsR` managers keep
    /// their sessions and counters.
    pub previous: Option<&'a Rules>,
}

impl From<'_> {
    fn previous_session(&self, name: &str) -> Option<&Arc<SessionIpm>> {
        self.previous?.sessions.iter().find(|s| s.name() == name)
    }

    fn previous_quota(&self, name: &str) -> Option<&Arc<DwnConsR>> {
        self.previous?.quotas.iter().find(|q| q.name() == name)
    }
}

pub(super) fn build_rules(conf: ManagersConf, from: &From<'_>) -> Result<Rules, PolicyConfigError> {
    let file = from.file;
    let (state_dir, now) = (from.state_dir, from.now);
    let top = |key: &str, message: String| PolicyConfigError::Top {
        file: file.to_string(),
        key: key.to_string(),
        message,
    };
    let rule_text = conf.rules.as_deref().ok_or_else(|| {
        top(
            "rules",
            "missing (write rules = \"true\" to allow every request)".into(),
        )
    })?;
    let rule = Rule::parse(rule_text).map_err(|e| top("rules", e.to_string()))?;
    if conf.syslog_addr.is_some() {
        tracing::warn!("{file}: syslogAddr is ignored: logs go to the process's log output");
    }
    let jwt_expiration = conf
        .jwt_expiration
        .map(|d| d.0)
        .unwrap_or(DEFAULT_JWT_EXPIRATION);
    if jwt_expiration.is_zero() {
        return Err(top("jwtExpiration", "must be longer than 0".into()));
    }

    let user_dbs: Vec<(String, u64)> = [
        conf.map_db
            .as_ref()
            .map(|c| (format!("[mapDB] {:?}", c.name), fingerprint(c))),
        conf.ad_db
            .as_ref()
            .map(|c| (format!("[adDB] {:?}", c.name), fingerprint(c))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut b = Builder {
        file,
        map_db: conf
            .map_db
            .as_ref()
            .map(|c| UserDb::from_conf(file, c).map(Arc::new))
            .transpose()?,
        ad_db: conf
            .ad_db
            .as_ref()
            .map(|c| UserDb::from_ad_conf(file, c).map(Arc::new))
            .transpose()?,
        names: Vec::new(),
        managers: Vec::new(),
        by_name: HashMap::new(),
        settings: Vec::new(),
    };
    let mut sessions = Vec::new();
    macro_rules! at {
        ($section:literal, $c:expr) => {
            At {
                file: b.file,
                section: $section,
                name: &$c.name,
            }
        };
    }
    for c in &conf.range_ipm {
        let m = Manager::Range(RangeIpm::from_conf(file, c)?);
        b.add(&at!("[[rangeIPM]]", c), c, m)?;
    }
    for c in &conf.session_ipm {
        let at = at!("[[sessionIPM]]", c);
        let db = b.user_db(&at, "auth", &c.auth)?;
        let s = Arc::new(match from.previous_session(&c.name) {
            Some(old) => old.reconfigured(db, jwt_expiration, state_dir),
            None => SessionIpm::new(&c.name, db, jwt_expiration, state_dir)?,
        });
        sessions.push(s.clone());
        b.add(&at, &(c, jwt_expiration), Manager::Session(s))?;
    }
    for c in &conf.group_ipm {
        let at = at!("[[groupIPM]]", c);
        let user_db = b.user_db(&at, "userDBN", &c.user_dbn)?;
        b.add(
            &at,
            c,
            Manager::Group(GroupIpm {
                group: c.group.clone(),
                user_db,
            }),
        )?;
    }
    for c in &conf.host_matcher {
        let m = Manager::Host(HostMatcher::from_conf(file, c)?);
        b.add(&at!("[[hostMatcher]]", c), c, m)?;
    }
    for c in &conf.time_span {
        let m = Manager::Time(TimeSpan::from_conf(file, c)?);
        b.add(&at!("[[timeSpan]]", c), c, m)?;
    }
    let mut quotas = Vec::new();
    for c in &conf.dwn_cons_r {
        let at = at!("[[dwnConsR]]", c);
        let db = b.user_db(&at, "userDBN", &c.user_dbn)?;
        let flush = from.flush.clone();
        let d = Arc::new(match from.previous_quota(&c.name) {
            Some(old) => old.reconfigured(file, c, db, state_dir, now, flush)?,
            None => DwnConsR::from_conf(file, c, db, state_dir, now, flush)?,
        });
        quotas.push(d.clone());
        b.add(&at, c, Manager::DwnConsR(d))?;
    }
    for c in &conf.parent_proxy {
        let m = Manager::ParentProxy(Arc::new(parent_proxy_from_conf(file, c)?));
        b.add(&at!("[[parentProxy]]", c), c, m)?;
    }
    for c in &conf.net_iface {
        let m = Manager::NetIface(net_iface_from_conf(file, c)?);
        b.add(&at!("[[netIface]]", c), c, m)?;
    }

    let slots: Vec<Option<usize>> = rule
        .names()
        .iter()
        .map(|n| b.by_name.get(n).copied())
        .collect();
    let missing: Vec<&str> = rule
        .names()
        .iter()
        .zip(&slots)
        .filter(|(_, s)| s.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            "{file}: rules name {} with no manager: requests reaching them are denied",
            missing.join(", ")
        );
    }
    Ok(Rules {
        rule,
        slots,
        names: b.names,
        managers: b.managers,
        by_name: b.by_name,
        settings: b.settings,
        user_dbs,
        sessions,
        quotas,
        admins: conf.admins,
    })
}
