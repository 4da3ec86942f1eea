//! What one password check costs (`Authenticator::check`), each backend beside the
//! `static` check in the same run; authentication is once per proxy connection, never
//! per byte.
//!
//! - `auth/memory/static`: the configuration's accounts (constant-time compare);
//! - `auth/memory/cached`: an allow remembered by `Cached` over a `file` backend
//!   (salted SHA-256 key, map lookup); the file is not asked;
//! - `auth/uncached/file-argon2`, `file-bcrypt12`: a users file whose hash is what
//!   `anyproxy passwd` makes by default (argon2id, default parameters) and with
//!   `--bcrypt` (cost 12);
//! - `auth/uncached/ldap-bind`: a direct bind as the user (`user_dn`), and
//!   `ldap-search-bind-groups`: service bind, user search, user bind, service bind,
//!   group search (the README's example), both on a pooled connection to a `slapd`
//!   this bench starts on loopback (`tests/common/slapd.rs`); skipped, and said so,
//!   without `/usr/sbin/slapd`.
//!
//! `cargo bench --bench auth`
//!
//! `cargo test --all-targets` runs bench targets without `--bench`: then this does
//! nothing (no slapd, no hashing), so that the test suite only compiles it.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyproxy::auth::{Accounts, Attempt, Authenticator, Cached, Kind, Verdict};
use criterion::{Criterion, SamplingMode};
use tokio::runtime::Runtime;

#[path = "../tests/common/slapd.rs"]
#[allow(dead_code)]
mod slapd;

/// For `slapd.rs`: nothing else in this process opens connections while it binds.
fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

const ATTEMPT: Attempt<'static> = Attempt {
    kind: Kind::Proxy,
    username: "alice",
    password: "alice-pw",
    client_ip: None,
    client_id: None,
    listener: "http",
};

/// Measures `iters` checks, all allowed, in one task of the runtime.
fn run(rt: &Runtime, backend: &dyn Authenticator, iters: u64) -> Duration {
    rt.block_on(async {
        let started = Instant::now();
        for _ in 0..iters {
            let verdict = backend.check(black_box(&ATTEMPT)).await;
            assert!(matches!(verdict, Ok(Verdict::Allow { .. })), "{verdict:?}");
        }
        started.elapsed()
    })
}

/// A `file` backend holding alice with `hash`.
fn users_file(dir: &std::path::Path, name: &str, hash: &str) -> Arc<dyn Authenticator> {
    let path = dir.join(format!("{name}.yaml"));
    let users =
        format!("users:\n  - {{ username: alice, password: \"{hash}\", groups: [office] }}\n");
    std::fs::write(&path, users).unwrap();
    let config = yaml_serde::from_str(&format!("{{path: \"{}\"}}", path.display())).unwrap();
    anyproxy::auth::file::FileBackend::open(name, config).unwrap()
}

fn ldap(url: &str, fields: &str) -> Arc<dyn Authenticator> {
    let config = yaml_serde::from_str(&format!("{{url: \"{url}\", {fields}}}")).unwrap();
    Arc::new(anyproxy::auth::ldap::LdapBackend::new("corp", config, None))
}

fn bench(c: &mut Criterion, rt: &Runtime) {
    use slapd::BASE;
    let dir = tempfile::tempdir().unwrap();
    let statics = Accounts::new(
        vec![(
            anyproxy::net::Credentials {
                username: "alice".into(),
                password: "alice-pw".into(),
            },
            Arc::from("office"),
        )],
        Arc::from("default"),
    );
    let argon2 = users_file(
        dir.path(),
        "argon2",
        &anyproxy::auth::hash::hash_argon2("alice-pw").unwrap(),
    );
    let bcrypt = users_file(
        dir.path(),
        "bcrypt",
        &anyproxy::auth::hash::hash_bcrypt("alice-pw", 12).unwrap(),
    );
    let cached = Cached::new(argon2.clone(), Duration::from_secs(3600));
    // The first check fills the cache.
    run(rt, &cached, 1);

    let mut memory = c.benchmark_group("auth/memory");
    memory.bench_function("static", |b| b.iter_custom(|n| run(rt, &statics, n)));
    memory.bench_function("cached", |b| b.iter_custom(|n| run(rt, &cached, n)));
    memory.finish();

    let server = if std::path::Path::new(slapd::SLAPD).exists() {
        Some(rt.block_on(slapd::Slapd::start()))
    } else {
        eprintln!("auth bench: {} not found, LDAP cases skipped", slapd::SLAPD);
        None
    };
    let directories = server.as_ref().map(|s| {
        let bind = ldap(&s.url(), &format!("user_dn: \"uid={{user}},ou=people,{BASE}\""));
        let search = ldap(
            &s.url(),
            &format!("base_dn: \"ou=people,{BASE}\", bind_dn: \"cn=admin,{BASE}\", bind_password: admin-pw, group_base_dn: \"ou=groups,{BASE}\", group_map: {{ staff: office }}"),
        );
        // The pool's first connection.
        run(rt, bind.as_ref(), 1);
        run(rt, search.as_ref(), 1);
        (bind, search)
    });

    // Milliseconds a check: a few samples of whole iterations.
    let mut uncached = c.benchmark_group("auth/uncached");
    uncached
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(10));
    uncached.bench_function("file-argon2", |b| {
        b.iter_custom(|n| run(rt, argon2.as_ref(), n))
    });
    uncached.bench_function("file-bcrypt12", |b| {
        b.iter_custom(|n| run(rt, bcrypt.as_ref(), n))
    });
    if let Some((bind, search)) = &directories {
        uncached.bench_function("ldap-bind", |b| {
            b.iter_custom(|n| run(rt, bind.as_ref(), n))
        });
        uncached.bench_function("ldap-search-bind-groups", |b| {
            b.iter_custom(|n| run(rt, search.as_ref(), n))
        });
    }
    uncached.finish();
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &rt);
    c.final_summary();
}
