//! The service manager's readiness protocol (systemd's `sd_notify(3)`), for units of
//! `Type=notify`: one datagram per state change to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). Without that
//! variable every call does nothing, so the process behaves the same under any other
//! supervisor or none.
//!
//! What is sent when: `READY=1` once the gateway's listeners are bound and its SIGHUP
//! handler installed (a reload signal never meets the default action), or once the
//! agent's first session authenticated; `RELOADING=1` then `READY=1` around a SIGHUP
//! reload; `STOPPING=1` when the graceful stop (the drain) begins.

use std::sync::atomic::{AtomicBool, Ordering};

/// The states this process reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Ready,
    Reloading,
    Stopping,
}

impl State {
    /// The assignment the protocol sends.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "READY=1",
            State::Reloading => "RELOADING=1",
            State::Stopping => "STOPPING=1",
        }
    }
}

/// Tells the service manager `state`, if there is one; a failure is logged (once),
/// never fatal: the service works the same, only its manager learns less.
pub fn notify(state: State) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = send(state.as_str()) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, state = state.as_str(), "cannot notify the service manager (NOTIFY_SOCKET)");
        }
    }
}

/// `READY=1` the first time only: an agent's later sessions (reconnects) change
/// nothing for its manager.
pub fn ready_once() {
    static SENT: AtomicBool = AtomicBool::new(false);
    if !SENT.swap(true, Ordering::Relaxed) {
        notify(State::Ready);
    }
}

/// Sends `message` to `$NOTIFY_SOCKET`; `Ok(false)` when it is not set.
#[cfg(unix)]
pub fn send(message: &str) -> std::io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(target) => send_to(&target, message).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `message` to the socket `target` names: a path, or `@name` (abstract).
#[cfg(unix)]
fn send_to(target: &std::ffi::OsStr, message: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    match target.as_bytes().strip_prefix(b"@") {
        Some(name) => send_abstract(&socket, name, message.as_bytes()),
        None => socket.send_to(message.as_bytes(), target).map(drop),
    }
}

#[cfg(not(unix))]
pub fn send(_message: &str) -> std::io::Result<bool> {
    Ok(false)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(
    socket: &std::os::unix::net::UnixDatagram,
    name: &[u8],
    message: &[u8],
) -> std::io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(message, &addr).map(drop)
}

#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
fn send_abstract(
    _socket: &std::os::unix::net::UnixDatagram,
    _name: &[u8],
    _message: &[u8],
) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract socket names exist on Linux only",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let by_path = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), State::Ready.as_str()).unwrap();
        assert_eq!(received(&by_path), "READY=1");

        let name = format!("anyproxy-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_socket = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(format!("@{name}").as_ref(), State::Stopping.as_str()).unwrap();
        assert_eq!(received(&abstract_socket), "STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nobody");
        assert!(send_to(gone.as_os_str(), "READY=1").is_err());
    }
}
