//! A real OpenLDAP `slapd` (Debian's package) for the `ldap` backend's tests and
//! `benches/auth.rs`: its own config and mdb database in a temporary directory, on a
//! loopback port, killed on drop. Seeded with four people (`alice`, `bob`, `carol`,
//! `office-agent`, password `<uid>-pw` except `agent-dir-pw`) and two groups (`staff`:
//! alice, bob, office-agent; `contractors`: carol) under [`BASE`]; the service account
//! is `cn=admin,<BASE>` / `admin-pw`. `stop` and `restart` on the same port stand for an
//! outage.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

pub const SLAPD: &str = "/usr/sbin/slapd";
pub const BASE: &str = "dc=example,dc=org";

pub struct Slapd {
    pub port: u16,
    /// With TLS: the `ldaps://` port (the `ldap://` one offers StartTLS).
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// How [`Slapd::start_with`] configures the directory.
#[derive(Clone, Copy, Default)]
pub struct SlapdOptions<'a> {
    /// The certificate and key slapd serves `ldaps://` and StartTLS with.
    pub tls: Option<(&'a Path, &'a Path)>,
    /// The `memberof` overlay: the people's entries get `memberOf`, kept by slapd
    /// itself as the groups are added.
    pub memberof: bool,
}

fn person(uid: &str, password: &str) -> String {
    format!(
        "dn: uid={uid},ou=people,{BASE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\nuserPassword: {password}\n\n"
    )
}

fn group(cn: &str, members: &[&str]) -> String {
    let members: String = members
        .iter()
        .map(|m| format!("member: uid={m},ou=people,{BASE}\n"))
        .collect();
    format!("dn: cn={cn},ou=groups,{BASE}\nobjectClass: groupOfNames\ncn: {cn}\n{members}\n")
}

impl Slapd {
    pub async fn start() -> Slapd {
        Self::start_with(SlapdOptions::default()).await
    }

    pub async fn start_with(options: SlapdOptions<'_>) -> Slapd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("db")).unwrap();
        let tls_lines = options.tls.map_or(String::new(), |(cert, key)| {
            format!(
                "TLSCertificateFile {}\nTLSCertificateKeyFile {}\n",
                cert.display(),
                key.display()
            )
        });
        let (memberof_module, memberof_overlay) = if options.memberof {
            (
                "moduleload memberof\n",
                "overlay memberof\nmemberof-group-oc groupOfNames\nmemberof-member-ad member\nmemberof-memberof-ad memberOf\n",
            )
        } else {
            ("", "")
        };
        let conf = format!(
            "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\ninclude /etc/ldap/schema/inetorgperson.schema\nmodulepath /usr/lib/ldap\nmoduleload back_mdb\n{memberof_module}{tls_lines}pidfile {pid}\ndatabase mdb\nmaxsize 10485760\nsuffix \"{BASE}\"\nrootdn \"cn=admin,{BASE}\"\nrootpw admin-pw\ndirectory {db}\n{memberof_overlay}access to attrs=userPassword by anonymous auth by self read by * none\naccess to * by * read\n",
            pid = d.join("slapd.pid").display(),
            db = d.join("db").display(),
        );
        std::fs::write(d.join("slapd.conf"), conf).unwrap();
        let mut seed = format!(
            "dn: {BASE}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\ndn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n\ndn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups\n\n"
        );
        for (uid, pw) in [
            ("alice", "alice-pw"),
            ("bob", "bob-pw"),
            ("carol", "carol-pw"),
            ("office-agent", "agent-dir-pw"),
        ] {
            seed.push_str(&person(uid, pw));
        }
        let groups =
            group("staff", &["alice", "bob", "office-agent"]) + &group("contractors", &["carol"]);
        // Overlays do not run under slapadd: with memberof, the groups are added to the
        // running slapd, so that the overlay writes the members' memberOf.
        if !options.memberof {
            seed.push_str(&groups);
        }
        std::fs::write(d.join("seed.ldif"), seed).unwrap();
        let out = std::process::Command::new("/usr/sbin/slapadd")
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .arg("-l")
            .arg(d.join("seed.ldif"))
            .output()
            .expect("slapd must be installed (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "slapadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut slapd = Slapd {
            port: super::free_port(),
            tls_port: options.tls.map(|_| super::free_port()),
            dir,
            child: None,
        };
        slapd.restart().await;
        if options.memberof {
            std::fs::write(slapd.dir.path().join("groups.ldif"), groups).unwrap();
            let out = Command::new("ldapadd")
                .args(["-x", "-H", &slapd.url(), "-D", &format!("cn=admin,{BASE}")])
                .args(["-w", "admin-pw", "-f"])
                .arg(slapd.dir.path().join("groups.ldif"))
                .output()
                .await
                .expect("ldapadd must be installed (scripts/test.sh installs ldap-utils)");
            assert!(
                out.status.success(),
                "ldapadd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        slapd
    }

    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// Starts slapd (again) in the foreground on its port; waits until it listens.
    pub async fn restart(&mut self) {
        let d: &Path = self.dir.path();
        let mut urls = format!("ldap://127.0.0.1:{}/", self.port);
        if let Some(p) = self.tls_port {
            urls.push_str(&format!(" ldaps://127.0.0.1:{p}/"));
        }
        let child = Command::new(SLAPD)
            .arg("-h")
            .arg(urls)
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .args(["-d", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("slapd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "slapd never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills slapd (an outage) and waits until it is gone.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }
}
