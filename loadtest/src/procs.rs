//! Child processes that cannot outlive the harness, and what /proc says about them.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// A child process killed when dropped: on success, on error and on Ctrl-C alike
/// (main drops the running scenario when the signal arrives).
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Proc {
    pub fn pid(&self) -> Result<u32> {
        self.child
            .id()
            .with_context(|| format!("{} has already exited", self.name))
    }

    /// Fails with the tail of the process's log if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }
}

impl Proc {
    /// Sends SIGTERM and waits at most `within` for the process to exit; past that it
    /// is killed and the stop counts as failed.
    pub async fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.pid()?;
        // SAFETY: kill(2) on our own child's pid, which we have not yet reaped.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
            bail!("SIGTERM to {} ({pid}) failed", self.name);
        }
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                bail!(
                    "{} did not exit within {within:?} of SIGTERM; log {}:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log)
                )
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A command whose process dies with the harness even when the harness is SIGKILLed,
/// which no drop guard can handle.
pub fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.kill_on_drop(true).stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// Spawns a long-running server process with stdout and stderr in `log`.
pub fn spawn(name: &str, program: &Path, args: &[&str], log: &Path) -> Result<Proc> {
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = command(program)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("spawn {name} ({})", program.display()))?;
    Ok(Proc {
        name: name.to_string(),
        child,
        log: log.to_path_buf(),
    })
}

/// Polls `ready` until it holds, failing early if `proc` dies and after 30 s.
async fn wait_until(proc: &mut Proc, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!("{} never {what}; log:\n{}", proc.name, log_tail(&proc.log));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits until something listens on `port`, without connecting to it (a probe would
/// count as a client: a failed TLS handshake in a log, a bogus iperf3 test) and
/// without binding it ourselves (which could make the real owner's bind fail).
pub async fn wait_for_listening(port: u16, proc: &mut Proc) -> Result<()> {
    wait_until(proc, &format!("listened on port {port}"), || {
        is_listening(port)
    })
    .await
}

/// Whether /proc/net/tcp shows a socket in LISTEN state on `port`.
fn is_listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
    })
}

/// Waits until `proc`'s log holds `needle` `times` times.
pub async fn wait_for_log(proc: &mut Proc, needle: &str, times: usize) -> Result<()> {
    let log = proc.log.clone();
    wait_until(proc, &format!("logged {needle:?}"), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.matches(needle).count() >= times
    })
    .await
}

static KEEP_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn keep_logs(keep: bool) {
    KEEP_LOGS.store(keep, std::sync::atomic::Ordering::Relaxed);
}

/// A working directory for configs and logs: removed on drop, unless --keep-logs asked
/// to keep it for a post-mortem.
pub fn work_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    if KEEP_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        dir.disable_cleanup(true);
        eprintln!("  (keeping {})", dir.path().display());
    }
    Ok(dir)
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resident memory in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// Thread count (`Threads:` in /proc/PID/status).
pub fn threads(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Threads in /proc/{pid}/status"))
}

pub fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("read /proc/{pid}/fd"))?
        .count())
}

/// User + system CPU time the process has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name may hold spaces; fields are counted after its closing paren.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("malformed /proc/PID/stat")
    };
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_micros(total * 1_000_000 / hz))
}

/// CPU used by a set of processes between two points: the cost side of a throughput.
pub struct CpuMeter {
    pids: Vec<u32>,
    start: Duration,
}

impl CpuMeter {
    pub fn start(pids: &[u32]) -> Result<CpuMeter> {
        Ok(CpuMeter {
            pids: pids.to_vec(),
            start: sum_cpu(pids)?,
        })
    }

    pub fn elapsed(&self) -> Result<Duration> {
        Ok(sum_cpu(&self.pids)?.saturating_sub(self.start))
    }
}

fn sum_cpu(pids: &[u32]) -> Result<Duration> {
    pids.iter().map(|p| cpu_time(*p)).sum()
}

/// Raises this process's open-file limit to its hard limit; children inherit it.
/// Returns the limit now in force.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Finds `name` on PATH (or takes it as a path when it holds a slash).
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    if name.contains('/') {
        let p = std::path::PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// How often an iperf3 run is tried again while its server still says it is busy.
const IPERF3_BUSY_RETRIES: u32 = 10;

/// Whether `e` is iperf3's "the server is busy running a test" and one more try (after
/// a second's pause, counted in `attempt`) is allowed. The server serves one test at a
/// time and ends the last one only once all its data connections closed, which through
/// a tunnel can trail the client's exit.
pub async fn iperf3_busy(e: &anyhow::Error, attempt: &mut u32) -> bool {
    if *attempt >= IPERF3_BUSY_RETRIES || !e.to_string().contains("server is busy") {
        return false;
    }
    *attempt += 1;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    true
}
