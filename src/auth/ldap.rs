//! The `ldap` backend: a simple bind as the user (straight to a DN template, or to
//! the entry a search finds), groups from an attribute of the user's entry
//! (`memberOf`) and/or a group search (`(member={dn})`), mapped to anyproxy groups.
//! `ldap://` (optionally StartTLS) or `ldaps://`; every check bounded by `timeout`;
//! up to `pool_size` connections, kept for reuse.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ldap3::{dn_escape, ldap_escape, Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::config::LdapConfig;
use super::{Attempt, Authenticator, BackendError, CheckFuture, Verdict};

/// `invalidCredentials` (RFC 4511): a wrong password or no such DN.
const INVALID_CREDENTIALS: u32 = 49;

pub struct LdapBackend {
    name: String,
    config: LdapConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    idle: Mutex<Vec<Ldap>>,
    open: Semaphore,
}

/// What went wrong in one check: the directory said no, or could not be asked.
enum Failure {
    Denied(Option<String>),
    Down(String),
}

impl From<ldap3::LdapError> for Failure {
    fn from(e: ldap3::LdapError) -> Self {
        Failure::Down(e.to_string())
    }
}

impl LdapBackend {
    /// `tls` (the roots the directory's certificate must chain to) is used for
    /// `ldaps://` and StartTLS.
    pub fn new(name: &str, config: LdapConfig, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        LdapBackend {
            name: name.to_owned(),
            open: Semaphore::new(config.pool_size),
            config,
            tls,
            idle: Mutex::new(Vec::new()),
        }
    }

    async fn connect(&self) -> Result<Ldap, Failure> {
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(self.config.timeout.0)
            .set_starttls(self.config.starttls);
        if let Some(tls) = &self.tls {
            settings = settings.set_config(tls.clone());
        }
        let (conn, ldap) = LdapConnAsync::with_settings(settings, &self.config.url).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!(error = %e, "LDAP connection ended");
            }
        });
        Ok(ldap)
    }

    /// A bind: `Ok(false)` for invalid credentials, an error for anything else.
    async fn bind(ldap: &mut Ldap, dn: &str, password: &str) -> Result<bool, Failure> {
        let result = ldap.simple_bind(dn, password).await?;
        match result.rc {
            0 => Ok(true),
            INVALID_CREDENTIALS => Ok(false),
            rc => Err(Failure::Down(format!(
                "bind answered {rc} ({})",
                result.text
            ))),
        }
    }

    /// The service account's bind (or anonymous).
    async fn bind_service(&self, ldap: &mut Ldap) -> Result<(), Failure> {
        let (dn, pw) = match (&self.config.bind_dn, &self.config.bind_password) {
            (Some(dn), Some(pw)) => (dn.as_str(), pw.expose()),
            _ => ("", ""),
        };
        if Self::bind(ldap, dn, pw).await? {
            Ok(())
        } else {
            Err(Failure::Down(
                "the service account's bind was refused".into(),
            ))
        }
    }

    async fn search(
        ldap: &mut Ldap,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: Vec<&str>,
    ) -> Result<Vec<SearchEntry>, Failure> {
        let (entries, result) = ldap.search(base, scope, filter, attrs).await?.non_error()?;
        // rc 32 (noSuchObject): nothing there.
        if result.rc != 0 && result.rc != 32 {
            return Err(Failure::Down(format!("search answered {}", result.rc)));
        }
        entries
            .into_iter()
            .map(|e| {
                // The crate panics on an entry it cannot parse: a broken answer, not a crash.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| SearchEntry::construct(e)))
                    .map_err(|_| Failure::Down("malformed search entry".into()))
            })
            .collect()
    }

    /// One check on one connection.
    async fn check_on(
        &self,
        ldap: &mut Ldap,
        user: &str,
        password: &str,
    ) -> Result<Vec<Arc<str>>, Failure> {
        let c = &self.config;
        let group_attr: Vec<&str> = c.group_attribute.iter().map(String::as_str).collect();
        let (dn, mut group_dns) = match (&c.user_dn, &c.base_dn) {
            (Some(template), _) => (template.replace("{user}", &dn_escape(user)), Vec::new()),
            (None, Some(base)) => {
                self.bind_service(ldap).await?;
                let filter = c.user_filter.replace("{user}", &ldap_escape(user));
                let attrs = if group_attr.is_empty() {
                    vec!["1.1"]
                } else {
                    group_attr.clone()
                };
                let mut found = Self::search(ldap, base, Scope::Subtree, &filter, attrs).await?;
                match found.len() {
                    0 => return Err(Failure::Denied(None)),
                    1 => {}
                    _ => {
                        return Err(Failure::Denied(Some(
                            "the user name matches several directory entries".into(),
                        )))
                    }
                }
                let entry = found.remove(0);
                let groups = group_values(&entry, &group_attr);
                (entry.dn, groups)
            }
            (None, None) => return Err(Failure::Down("neither user_dn nor base_dn".into())),
        };
        if !Self::bind(ldap, &dn, password).await? {
            return Err(Failure::Denied(None));
        }
        if c.user_dn.is_some() && !group_attr.is_empty() {
            let own = Self::search(
                ldap,
                &dn,
                Scope::Base,
                "(objectClass=*)",
                group_attr.clone(),
            )
            .await?;
            group_dns.extend(own.iter().flat_map(|e| group_values(e, &group_attr)));
        }
        let mut names: Vec<String> = group_dns.iter().map(|d| first_rdn_value(d)).collect();
        if let Some(base) = &c.group_base_dn {
            if c.bind_dn.is_some() {
                self.bind_service(ldap).await?;
            }
            let filter = c
                .group_filter
                .replace("{dn}", &ldap_escape(dn.as_str()))
                .replace("{user}", &ldap_escape(user));
            let name_attr = c.group_name_attribute.as_str();
            for g in Self::search(ldap, base, Scope::Subtree, &filter, vec![name_attr]).await? {
                names.extend(g.attrs.get(name_attr).into_iter().flatten().cloned());
                group_dns.push(g.dn);
            }
        }
        Ok(self.map_groups(&group_dns, &names))
    }

    /// Directory groups (DNs and names) → anyproxy groups, in order, without repeats.
    fn map_groups(&self, dns: &[String], names: &[String]) -> Vec<Arc<str>> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let map = &self.config.group_map;
        for g in dns.iter().chain(names) {
            let mapped = if map.is_empty() {
                if dns.contains(g) {
                    continue;
                }
                Some(g.clone())
            } else {
                map.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(g))
                    .map(|(_, v)| v.clone())
            };
            if let Some(m) = mapped {
                if seen.insert(m.clone()) {
                    out.push(Arc::from(m.as_str()));
                }
            }
        }
        out
    }

    async fn run(&self, user: &str, password: &str) -> Result<Verdict, BackendError> {
        let down = |m: String| BackendError::new(&self.name, m);
        let _permit = self
            .open
            .acquire()
            .await
            .map_err(|_| down("closed".into()))?;
        // A pooled connection may have died with the directory: one retry on a new one.
        let pooled = self.idle.lock().pop();
        let attempts = if pooled.is_some() { 2 } else { 1 };
        let mut pooled = pooled;
        let mut last = String::new();
        for _ in 0..attempts {
            let mut ldap = match pooled.take() {
                Some(l) => l,
                None => match self.connect().await {
                    Ok(l) => l,
                    Err(Failure::Down(m)) => return Err(down(format!("cannot connect: {m}"))),
                    Err(Failure::Denied(_)) => return Err(down("cannot connect".into())),
                },
            };
            ldap.with_timeout(self.config.timeout.0);
            match self.check_on(&mut ldap, user, password).await {
                Ok(groups) => {
                    self.keep(ldap);
                    return Ok(Verdict::Allow { groups });
                }
                Err(Failure::Denied(reason)) => {
                    self.keep(ldap);
                    return Ok(Verdict::Deny { reason });
                }
                Err(Failure::Down(m)) => last = m,
            }
        }
        Err(down(last))
    }

    fn keep(&self, ldap: Ldap) {
        let mut idle = self.idle.lock();
        if idle.len() < self.config.pool_size {
            idle.push(ldap);
        }
    }
}

/// The values of `attrs` on `entry` (group DNs).
fn group_values(entry: &SearchEntry, attrs: &[&str]) -> Vec<String> {
    attrs
        .iter()
        .flat_map(|a| {
            entry
                .attrs
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(a))
                .flat_map(|(_, v)| v.clone())
        })
        .collect()
}

/// `staff` of `cn=staff,ou=groups,dc=example,dc=org`.
fn first_rdn_value(dn: &str) -> String {
    let rdn = dn.split(',').next().unwrap_or(dn);
    rdn.split_once('=')
        .map_or(rdn, |(_, v)| v)
        .trim()
        .to_owned()
}

impl Authenticator for LdapBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn check<'a>(&'a self, attempt: &'a Attempt<'a>) -> CheckFuture<'a> {
        Box::pin(async move {
            // An empty password is an anonymous bind, which succeeds: never a login.
            if attempt.password.is_empty() || attempt.username.is_empty() {
                return Ok(Verdict::Deny { reason: None });
            }
            let budget: Duration = self.config.timeout.0 * 2;
            tokio::time::timeout(budget, self.run(attempt.username, attempt.password))
                .await
                .map_err(|_| {
                    BackendError::new(&self.name, format!("no answer within {budget:?}"))
                })?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(map: &[(&str, &str)]) -> LdapBackend {
        let mut config: LdapConfig =
            yaml_serde::from_str("{url: \"ldap://127.0.0.1:1\", base_dn: \"dc=x\"}").unwrap();
        config.group_map = map
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        LdapBackend::new("corp", config, None)
    }

    #[test]
    fn directory_groups_map_by_name_or_dn() {
        let dns = vec!["cn=Staff,ou=groups,dc=x".to_owned()];
        let names = vec!["Staff".to_owned(), "lab".to_owned()];
        assert_eq!(first_rdn_value(&dns[0]), "Staff");
        let mapped = backend(&[("staff", "office")]).map_groups(&dns, &names);
        assert_eq!(mapped, vec![Arc::<str>::from("office")]);
        let by_dn = backend(&[("CN=staff,ou=groups,dc=x", "office")]).map_groups(&dns, &[]);
        assert_eq!(by_dn, vec![Arc::<str>::from("office")]);
        let unmapped = backend(&[]).map_groups(&dns, &names);
        assert_eq!(unmapped, vec![Arc::<str>::from("Staff"), Arc::from("lab")]);
    }
}
