//! Static files from `webStaticFilesDir`, for a web interface. Paths are decoded once and
//! checked segment by segment, then the resolved file must still lie inside the root
//! (a symlink pointing out of it is refused too).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use hyper::StatusCode;

use super::{respond, ApiOptions, Resp};
use crate::net::percent_decode;

/// Static files are read whole; a web interface's files are far below this.
const MAX_FILE: u64 = 32 << 20;

fn content_type(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        Some("ico") => "image/x-icon",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("woff2") => "font/woff2",
        Some("woff") => "font/woff",
        Some("txt") => "text/plain; charset=utf-8",
        Some("wasm") => "application/wasm",
        _ => "application/octet-stream",
    }
}

fn not_found() -> Resp {
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "not found\n",
    )
}

fn bad_path() -> Resp {
    respond(
        StatusCode::BAD_REQUEST,
        "text/plain; charset=utf-8",
        "bad path\n",
    )
}

fn is_excluded(path: &str, routes: &[String]) -> bool {
    routes.iter().any(|r| {
        let r = r.trim_end_matches('/');
        path == r
            || path
                .strip_prefix(r)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// The file a request path names, relative to the root, or `None` for a path that tries
/// to leave it.
fn relative(path: &str) -> Option<PathBuf> {
    let decoded = String::from_utf8(percent_decode(path)?).ok()?;
    let mut rel = PathBuf::new();
    for seg in decoded.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." || seg.contains(['\\', '\0', ':']) {
            return None;
        }
        rel.push(seg);
    }
    Some(rel)
}

pub async fn serve(path: &str, opts: &ApiOptions) -> Resp {
    let Some(root) = &opts.static_dir else {
        return not_found();
    };
    let rel = if is_excluded(path, &opts.excluded_routes) {
        PathBuf::from("index.html")
    } else {
        match relative(path) {
            Some(r) => r,
            None => return bad_path(),
        }
    };
    let Ok(root) = tokio::fs::canonicalize(root).await else {
        return not_found();
    };
    let mut file = root.join(&rel);
    if tokio::fs::metadata(&file).await.is_ok_and(|m| m.is_dir()) {
        file.push("index.html");
    }
    let Ok(file) = tokio::fs::canonicalize(&file).await else {
        return not_found();
    };
    if !file.starts_with(&root) {
        return not_found();
    }
    match tokio::fs::metadata(&file).await {
        Ok(m) if m.is_file() && m.len() <= MAX_FILE => {}
        _ => return not_found(),
    }
    match tokio::fs::read(&file).await {
        Ok(bytes) => respond(StatusCode::OK, content_type(&file), Bytes::from(bytes)),
        Err(_) => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_after_decoding() {
        assert_eq!(relative("/a/b.css"), Some(PathBuf::from("a/b.css")));
        assert_eq!(relative("//a//b"), Some(PathBuf::from("a/b")));
        assert_eq!(relative("/"), Some(PathBuf::new()));
        for bad in [
            "/../etc/passwd",
            "/a/%2e%2e/%2e%2e/x",
            "/a/..%2fb",
            "/%5c..",
            "/%zz",
            "/%00",
        ] {
            assert_eq!(relative(bad), None, "{bad}");
        }
        let routes = vec!["/about".to_string(), "/app/".to_string()];
        assert!(is_excluded("/about", &routes));
        assert!(is_excluded("/app/users/1", &routes));
        assert!(!is_excluded("/aboutx", &routes));
        assert_eq!(content_type(Path::new("x.SVG")), "image/svg+xml");
    }
}
