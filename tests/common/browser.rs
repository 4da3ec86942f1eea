//! Headless Chromium from Debian's packages, for the status page tests.

use std::path::Path;
use std::time::Duration;

/// The browser's command name; panics with the install hint when there is none.
pub fn chromium() -> String {
    for name in ["chromium", "chromium-browser"] {
        if std::process::Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name.to_owned();
        }
    }
    panic!(
        "headless Chromium is required for the status page test and was not found; \
         `bash scripts/test.sh` installs it (apt-get install -y chromium)"
    );
}

pub async fn run_chromium(browser: &str, profile: &Path, args: &[String]) -> Vec<u8> {
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium finished within 90 s")
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
