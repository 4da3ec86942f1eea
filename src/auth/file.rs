//! The `file` backend: a users file with bcrypt or argon2 hashes and groups, in YAML
//!
//! ```yaml
//! users:
//!   - username: alice
//!     password: "$argon2id$v=19$..."
//!     groups: [office]
//! ```
//!
//! or htpasswd style, one `user:hash[:group,group]` a line (`#` starts a comment).
//! Plain-text passwords are refused unless `allow_plaintext`. The file is looked at
//! every `reload_interval` (modification time and size); a broken edit keeps the
//! previous users and logs the line at fault.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use serde::Deserialize;

use super::config::{FileConfig, FileFormat};
use super::hash::{verify_unknown, Stored};
use super::{Attempt, Authenticator, BackendError, CheckFuture, Verdict};

#[derive(Debug)]
struct User {
    password: Stored,
    groups: Vec<Arc<str>>,
}

impl User {
    /// Whether a reload left this entry as it was: a new password or other groups
    /// end what the old one allowed.
    fn same_as(&self, other: &User) -> bool {
        self.groups == other.groups && self.password.same_as(&other.password)
    }
}

#[derive(Debug, Default)]
struct Users {
    by_name: HashMap<String, User>,
    hashed: bool,
}

/// Why a users file was not loaded: the line at fault (1-based; 0 when the whole file
/// is) and what is wrong there.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {message}")]
pub struct FileError {
    pub path: String,
    pub line: usize,
    pub message: String,
}

pub struct FileBackend {
    name: String,
    config: FileConfig,
    users: RwLock<Arc<Users>>,
    /// Modification time and size of the file last looked at.
    stamp: Mutex<Option<(SystemTime, u64)>>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl FileBackend {
    /// Loads the file; a file that cannot be read or parsed is a start-up error.
    pub fn open(name: &str, config: FileConfig) -> Result<Arc<FileBackend>, FileError> {
        let backend = FileBackend {
            name: name.to_owned(),
            stamp: Mutex::new(stamp(&config.path)),
            users: RwLock::new(Arc::new(Users::default())),
            config,
        };
        let users = backend.load()?;
        *backend.users.write() = Arc::new(users);
        Ok(Arc::new(backend))
    }

    fn load(&self) -> Result<Users, FileError> {
        let path = &self.config.path;
        let text = std::fs::read_to_string(path).map_err(|e| FileError {
            path: path.display().to_string(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        parse(&text, self.config.format(), self.config.allow_plaintext).map_err(
            |(line, message)| FileError {
                path: path.display().to_string(),
                line,
                message,
            },
        )
    }

    /// Reloads the file if it changed since last looked at. When new users were
    /// loaded: the users it removed or changed (password or groups), whose live
    /// connections the old entry allowed. A broken file keeps the previous users and
    /// is logged with its line.
    pub fn reload_if_changed(&self) -> Option<Vec<String>> {
        let now = stamp(&self.config.path);
        {
            let mut last = self.stamp.lock();
            if *last == now {
                return None;
            }
            *last = now;
        }
        match self.load() {
            Ok(users) => {
                let n = users.by_name.len();
                let before = self.users.read().clone();
                let mut gone: Vec<String> = before
                    .by_name
                    .iter()
                    .filter(|(name, was)| {
                        users.by_name.get(*name).is_none_or(|now| !now.same_as(was))
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                gone.sort();
                // Only this reload writes: nothing changed between the read and here.
                *self.users.write() = Arc::new(users);
                tracing::info!(backend = %self.name, users = n, removed_or_changed = gone.len(), "users file reloaded");
                Some(gone)
            }
            Err(e) => {
                tracing::warn!(backend = %self.name, file = %e.path, line = e.line, error = %e.message, "users file not reloaded; keeping the previous users");
                None
            }
        }
    }

    /// Looks at the file every `reload_interval` until the backend is dropped;
    /// `on_reload` runs after each successful reload with the users it removed or
    /// changed (it clears the cache and closes their connections).
    pub fn watch(self: &Arc<Self>, on_reload: impl Fn(&[String]) + Send + 'static) {
        let weak: Weak<FileBackend> = Arc::downgrade(self);
        let every = self.config.reload_interval.0;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(backend) = weak.upgrade() else {
                    return;
                };
                let reloaded = tokio::task::spawn_blocking(move || backend.reload_if_changed())
                    .await
                    .ok()
                    .flatten();
                if let Some(gone) = reloaded {
                    on_reload(&gone);
                }
            }
        });
    }
}

impl Authenticator for FileBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn check<'a>(&'a self, attempt: &'a Attempt<'a>) -> CheckFuture<'a> {
        Box::pin(async move {
            // Hash checks take milliseconds of CPU: off the async workers.
            let (user, pass) = (attempt.username.to_owned(), attempt.password.to_owned());
            let users = self.users.read().clone();
            let hashed = users.hashed;
            let entry = users
                .by_name
                .get(&user)
                .map(|u| (u.password.clone(), u.groups.clone()));
            tokio::task::spawn_blocking(move || match entry {
                Some((stored, groups)) if stored.verify(&pass) => Verdict::Allow { groups },
                Some(_) => Verdict::Deny { reason: None },
                None => {
                    verify_unknown(hashed, &pass);
                    Verdict::Unknown
                }
            })
            .await
            .map_err(|e| BackendError::new(&self.name, format!("check failed: {e}")))
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlFile {
    #[serde(default)]
    users: Vec<YamlUser>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlUser {
    username: String,
    password: String,
    #[serde(default)]
    groups: Vec<String>,
}

/// The 1-based line of the `index`-th user entry of a YAML users file (each entry
/// has one `username:` key), for errors about that entry.
fn yaml_entry_line(text: &str, index: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim_start().trim_start_matches("- ").trim_start();
            t.starts_with("username:")
        })
        .nth(index)
        .map_or(0, |(i, _)| i + 1)
}

/// Parses a users file; `Err((line, message))` names the line at fault.
fn parse(text: &str, format: FileFormat, allow_plaintext: bool) -> Result<Users, (usize, String)> {
    let mut entries: Vec<(usize, String, String, Vec<String>)> = Vec::new();
    match format {
        FileFormat::Yaml => {
            let file: YamlFile = yaml_serde::from_str(text)
                .map_err(|e| (e.location().map_or(0, |l| l.line()), e.to_string()))?;
            for (i, u) in file.users.into_iter().enumerate() {
                entries.push((yaml_entry_line(text, i), u.username, u.password, u.groups));
            }
        }
        FileFormat::Htpasswd => {
            for (i, line) in text.lines().enumerate() {
                let line_no = i + 1;
                let t = line.trim();
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                let Some((user, rest)) = t.split_once(':') else {
                    return Err((line_no, "expected user:hash[:group,group]".into()));
                };
                // A hash has no ':' (bcrypt and PHC strings use '$' and ','), so the
                // last ':' starts the groups, if any.
                let (pass, groups) = match rest.rsplit_once(':') {
                    Some((p, g)) if !p.is_empty() => (p, g),
                    _ => (rest, ""),
                };
                let groups = groups
                    .split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_owned)
                    .collect();
                entries.push((line_no, user.trim().to_owned(), pass.to_owned(), groups));
            }
        }
    }
    let mut users = Users::default();
    for (line, username, password, groups) in entries {
        if username.is_empty() {
            return Err((line, "empty user name".into()));
        }
        let stored =
            Stored::parse(&password).map_err(|e| (line, format!("user {username:?}: {e}")))?;
        if stored.is_plain() && !allow_plaintext {
            return Err((
                line,
                format!("user {username:?}: plain-text password refused (store an argon2 or bcrypt hash, see `anyproxy passwd`, or set allow_plaintext)"),
            ));
        }
        users.hashed |= !stored.is_plain();
        let user = User {
            password: stored,
            groups: groups.iter().map(|g| Arc::from(g.as_str())).collect(),
        };
        if users.by_name.insert(username.clone(), user).is_some() {
            return Err((line, format!("user {username:?} appears twice")));
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::super::hash::{hash_argon2, hash_bcrypt};
    use super::*;

    #[test]
    fn both_formats_name_the_line_at_fault() {
        let a = hash_argon2("pa").unwrap();
        let b = hash_bcrypt("pb", 4).unwrap();
        let yaml = format!(
            "users:\n  - username: alice\n    password: \"{a}\"\n    groups: [office]\n  - username: bob\n    password: \"{b}\"\n"
        );
        let users = parse(&yaml, FileFormat::Yaml, false).unwrap();
        assert!(users.by_name["alice"].password.verify("pa"));
        assert_eq!(&*users.by_name["alice"].groups[0], "office");
        assert!(users.by_name["bob"].password.verify("pb"));
        let broken = yaml.replace(&b, "plain");
        let (line, message) = parse(&broken, FileFormat::Yaml, false).unwrap_err();
        assert_eq!(line, 5, "{message}");
        assert!(parse(&broken, FileFormat::Yaml, true).is_ok());
        let (line, _) = parse("users:\n  - username: [x\n", FileFormat::Yaml, false).unwrap_err();
        assert!(line >= 2);

        let ht = format!("# users\nalice:{a}:office,lab\n\nbob:{b}\n");
        let users = parse(&ht, FileFormat::Htpasswd, false).unwrap();
        assert_eq!(users.by_name["alice"].groups.len(), 2);
        assert!(users.by_name["bob"].groups.is_empty());
        assert!(users.by_name["bob"].password.verify("pb"));
        let (line, _) = parse(&format!("{ht}carol\n"), FileFormat::Htpasswd, false).unwrap_err();
        assert_eq!(line, 5);
        let (line, _) = parse("x:$2b$04$bad\n", FileFormat::Htpasswd, false).unwrap_err();
        assert_eq!(line, 1);
    }

    #[test]
    fn a_reload_names_the_users_it_removed_or_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(&path, "alice:pa:office\nbob:pb\ncarol:pc:lab\ndave:pd\n").unwrap();
        let config = FileConfig {
            path: path.clone(),
            format: Some(FileFormat::Htpasswd),
            allow_plaintext: true,
            reload_interval: crate::net::HumanDuration(std::time::Duration::from_secs(1)),
            cache_ttl: crate::net::HumanDuration(std::time::Duration::from_secs(1)),
        };
        let backend = FileBackend::open("users", config).unwrap();
        assert_eq!(backend.reload_if_changed(), None, "unchanged");
        // alice removed, bob's password and carol's groups changed, dave kept, erin new.
        std::fs::write(&path, "bob:pb2\ncarol:pc:office\ndave:pd\nerin:pe\n").unwrap();
        assert_eq!(
            backend.reload_if_changed(),
            Some(vec![
                "alice".to_owned(),
                "bob".to_owned(),
                "carol".to_owned()
            ])
        );
        // A broken edit changes nothing and names nobody.
        std::fs::write(&path, "bob\n").unwrap();
        assert_eq!(backend.reload_if_changed(), None);
    }
}
