//! Percent-encoding (RFC 3986) for the few places that build or read URLs by hand: a
//! request path or query, the userinfo of a proxy URL.

/// Decodes `%XX` escapes; `None` on a truncated or non-hex escape.
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Escapes everything but RFC 3986's unreserved characters, so that the result is safe
/// in any URL component (a proxy URL's username or password, a query value).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_escapes() {
        let s = "p@ss:w/rd %ü";
        let enc = percent_encode(s);
        assert_eq!(enc, "p%40ss%3Aw%2Frd%20%25%C3%BC");
        assert_eq!(percent_decode(&enc).unwrap(), s.as_bytes());
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("a%zz"), None);
    }
}
