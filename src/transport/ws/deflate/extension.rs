//! `Sec-WebSocket-Extensions`: the RFC 6455 §9.1 grammar and the permessage-deflate
//! negotiation of RFC 7692 §5 and §7.1, both sides.

use super::{DeflateConfig, DeflateParams, MAX_WINDOW_BITS, MIN_WINDOW_BITS};

pub const NAME: &str = "permessage-deflate";

const SERVER_NCT: &str = "server_no_context_takeover";
const CLIENT_NCT: &str = "client_no_context_takeover";
const SERVER_MWB: &str = "server_max_window_bits";
const CLIENT_MWB: &str = "client_max_window_bits";

/// One element of an extension list: a name and its parameters (names lowercased,
/// values unquoted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub name: String,
    pub params: Vec<(String, Option<String>)>,
}

/// Every element of every header value, in order; a malformed element is an `Err` of
/// its own so that a server can decline it and still look at the others.
pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Result<Extension, String>> {
    let mut out = Vec::new();
    for value in values {
        match split_unquoted(value, b',') {
            Ok(elements) => out.extend(
                elements
                    .into_iter()
                    .map(str::trim)
                    // `1#element` allows empty list elements.
                    .filter(|e| !e.is_empty())
                    .map(parse_element),
            ),
            Err(e) => out.push(Err(e)),
        }
    }
    out
}

fn parse_element(element: &str) -> Result<Extension, String> {
    let mut parts = split_unquoted(element, b';')?.into_iter().map(str::trim);
    let name = parts.next().unwrap_or_default();
    if !is_token(name) {
        return Err(format!("bad extension name {name:?}"));
    }
    let mut params = Vec::new();
    for part in parts {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
            None => (part, None),
        };
        if !is_token(key) {
            return Err(format!("bad parameter name {key:?}"));
        }
        params.push((key.to_ascii_lowercase(), value));
    }
    Ok(Extension {
        name: name.to_owned(),
        params,
    })
}

/// Splits on `sep` outside quoted strings (which may hold `\`-escapes).
fn split_unquoted(s: &str, sep: u8) -> Result<Vec<&str>, String> {
    let bytes = s.as_bytes();
    let (mut parts, mut start, mut quoted, mut i) = (Vec::new(), 0, false, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b if b == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if quoted {
        return Err(format!("unterminated quoted string in {s:?}"));
    }
    parts.push(&s[start.min(s.len())..]);
    Ok(parts)
}

/// RFC 6455 §9.1: a quoted value must still be a token once unquoted.
fn unquote(v: &str) -> Result<String, String> {
    let inner = match v.strip_prefix('"') {
        Some(rest) => {
            let rest = rest
                .strip_suffix('"')
                .ok_or_else(|| format!("bad quoted value {v:?}"))?;
            let mut s = String::with_capacity(rest.len());
            let mut chars = rest.chars();
            while let Some(c) = chars.next() {
                s.push(if c == '\\' {
                    chars.next().unwrap_or('\\')
                } else {
                    c
                });
            }
            s
        }
        None => v.to_owned(),
    };
    if is_token(&inner) {
        Ok(inner)
    } else {
        Err(format!("bad parameter value {v:?}"))
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The permessage-deflate parameters of one offer or response.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Params {
    server_nct: bool,
    client_nct: bool,
    server_mwb: Option<u8>,
    /// `Some(None)`: offered without a value (allowed in offers only).
    client_mwb: Option<Option<u8>>,
}

/// RFC 7692 §7.1: duplicates, unknown names and bad values make the whole element
/// invalid. Window sizes are 8..=15 in decimal without leading zeros.
fn parse_params(ext: &Extension, response: bool) -> Result<Params, String> {
    let mut p = Params::default();
    let mut seen: Vec<&str> = Vec::new();
    for (key, value) in &ext.params {
        if seen.contains(&key.as_str()) {
            return Err(format!("duplicate parameter {key}"));
        }
        seen.push(key);
        let bits = || -> Result<Option<u8>, String> {
            match value.as_deref() {
                None => Ok(None),
                Some(v) => match v.parse::<u8>() {
                    Ok(b) if (8..=15).contains(&b) && !v.starts_with('0') => Ok(Some(b)),
                    _ => Err(format!("{key}={v:?} is not 8..=15")),
                },
            }
        };
        match key.as_str() {
            SERVER_NCT | CLIENT_NCT if value.is_some() => {
                return Err(format!("{key} takes no value"));
            }
            SERVER_NCT => p.server_nct = true,
            CLIENT_NCT => p.client_nct = true,
            SERVER_MWB => {
                p.server_mwb = Some(bits()?.ok_or_else(|| format!("{key} needs a value"))?);
            }
            CLIENT_MWB => {
                let b = bits()?;
                if response && b.is_none() {
                    return Err(format!("{key} needs a value in a response"));
                }
                p.client_mwb = Some(b);
            }
            other => return Err(format!("unknown parameter {other}")),
        }
    }
    Ok(p)
}

/// Server side: the first acceptable permessage-deflate offer, with the response
/// header value to send and what it means for us. `None`: decline (no header).
pub fn accept(
    offers: &[Result<Extension, String>],
    config: &DeflateConfig,
) -> Option<(String, DeflateParams)> {
    if !config.enabled {
        return None;
    }
    offers
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .filter(|e| e.name.eq_ignore_ascii_case(NAME))
        .filter_map(|e| parse_params(e, false).ok())
        .find_map(|p| accept_one(p, config))
}

fn accept_one(offer: Params, config: &DeflateConfig) -> Option<(String, DeflateParams)> {
    // We cannot compress with a 256-byte window; declining is the only honest answer.
    if offer.server_mwb.is_some_and(|b| b < MIN_WINDOW_BITS) {
        return None;
    }
    let window = config
        .max_window_bits
        .min(offer.server_mwb.unwrap_or(MAX_WINDOW_BITS));
    // Either side may ask for no context takeover; we grant the client's request and
    // make our own in the response.
    let compress_reset = offer.server_nct || config.no_context_takeover;
    let decompress_reset = offer.client_nct || config.no_context_takeover;
    let mut response = NAME.to_owned();
    if compress_reset {
        response.push_str("; ");
        response.push_str(SERVER_NCT);
    }
    if decompress_reset {
        response.push_str("; ");
        response.push_str(CLIENT_NCT);
    }
    if offer.server_mwb.is_some() || window < MAX_WINDOW_BITS {
        response.push_str(&format!("; {SERVER_MWB}={window}"));
    }
    // client_max_window_bits is never answered: we inflate with 15 bits, so the client
    // may use any window.
    let (level, min_size, adaptive) = DeflateParams::tuning(config);
    Some((
        response,
        DeflateParams {
            compress_window_bits: window,
            compress_reset,
            decompress_reset,
            level,
            min_size,
            adaptive,
            worth_pct: 100,
        },
    ))
}

/// Client side: the offer to send, or `None` when deflate is disabled.
pub fn offer(config: &DeflateConfig) -> Option<String> {
    if !config.enabled {
        return None;
    }
    let mut offer = format!("{NAME}; {CLIENT_MWB}");
    if config.no_context_takeover {
        offer.push_str(&format!("; {SERVER_NCT}; {CLIENT_NCT}"));
    }
    if config.max_window_bits < MAX_WINDOW_BITS {
        offer.push_str(&format!("; {SERVER_MWB}={}", config.max_window_bits));
    }
    Some(offer)
}

/// Client side: checks the server's answer to [`offer`]. `Ok(None)`: declined. An
/// answer we did not allow for is an error (RFC 7692 §5: fail the connection).
pub fn check_response<'a>(
    values: impl IntoIterator<Item = &'a str>,
    config: &DeflateConfig,
) -> Result<Option<DeflateParams>, String> {
    let extensions = parse(values);
    let Some(first) = extensions.first() else {
        return Ok(None);
    };
    if !config.enabled {
        return Err("extensions in the response, none offered".into());
    }
    if extensions.len() > 1 {
        return Err("more than one extension in the response".into());
    }
    let ext = first.as_ref().map_err(Clone::clone)?;
    if !ext.name.eq_ignore_ascii_case(NAME) {
        return Err(format!("extension {:?} was not offered", ext.name));
    }
    let p = parse_params(ext, true)?;
    if let Some(bits) = p.server_mwb {
        if config.max_window_bits < MAX_WINDOW_BITS && bits > config.max_window_bits {
            return Err(format!(
                "{SERVER_MWB}={bits} is larger than the {} offered",
                config.max_window_bits
            ));
        }
    }
    // A limit below 9 is honoured by never compressing (see DeflateParams).
    let window = config
        .max_window_bits
        .min(p.client_mwb.flatten().unwrap_or(MAX_WINDOW_BITS));
    let (level, min_size, adaptive) = DeflateParams::tuning(config);
    Ok(Some(DeflateParams {
        compress_window_bits: window,
        compress_reset: config.no_context_takeover || p.client_nct,
        decompress_reset: p.server_nct,
        level,
        min_size,
        adaptive,
        worth_pct: 100,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> DeflateConfig {
        DeflateConfig {
            enabled: true,
            ..DeflateConfig::default()
        }
    }

    fn with_takeover() -> DeflateConfig {
        DeflateConfig {
            no_context_takeover: false,
            ..enabled()
        }
    }

    #[test]
    fn parses_lists_params_and_quotes() {
        let got = parse([
            "permessage-deflate; client_max_window_bits, foo",
            " x-webkit-deflate-frame ,, permessage-deflate ; SERVER_max_window_bits=\"10\"",
        ]);
        let names: Vec<_> = got
            .iter()
            .map(|e| e.as_ref().unwrap().name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "permessage-deflate",
                "foo",
                "x-webkit-deflate-frame",
                "permessage-deflate"
            ]
        );
        assert_eq!(
            got[0].as_ref().unwrap().params,
            [("client_max_window_bits".to_owned(), None)]
        );
        assert_eq!(
            got[3].as_ref().unwrap().params,
            [("server_max_window_bits".to_owned(), Some("10".to_owned()))]
        );
        for bad in [
            "permessage-deflate; a=\"1",
            "permessage-deflate; a=\"\"",
            "permessage-deflate; =1",
            "perm deflate",
            "permessage-deflate; a=1 2",
        ] {
            assert!(parse([bad]).iter().any(Result::is_err), "{bad}");
        }
        // A comma inside quotes does not split elements.
        assert!(parse(["e; a=\"x,y\""])[0].is_err());
        assert_eq!(parse(["e; a=\"x,y\""]).len(), 1);
    }

    /// Server answers: (offer header, config, expected response or None = declined).
    #[test]
    fn server_negotiation_table() {
        let cases: &[(&str, DeflateConfig, Option<&str>)] = &[
            // Python websockets' default offer.
            (
                "permessage-deflate; client_max_window_bits",
                enabled(),
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
            ),
            (
                "permessage-deflate",
                with_takeover(),
                Some("permessage-deflate"),
            ),
            (
                "permessage-deflate; server_no_context_takeover",
                with_takeover(),
                Some("permessage-deflate; server_no_context_takeover"),
            ),
            (
                "permessage-deflate; client_no_context_takeover",
                with_takeover(),
                Some("permessage-deflate; client_no_context_takeover"),
            ),
            (
                "permessage-deflate; server_max_window_bits=10",
                with_takeover(),
                Some("permessage-deflate; server_max_window_bits=10"),
            ),
            (
                "permessage-deflate",
                DeflateConfig {
                    max_window_bits: 12,
                    ..with_takeover()
                },
                Some("permessage-deflate; server_max_window_bits=12"),
            ),
            // 8 bits cannot be done; the next offer can.
            (
                "permessage-deflate; server_max_window_bits=8, permessage-deflate",
                with_takeover(),
                Some("permessage-deflate"),
            ),
            (
                "permessage-deflate; server_max_window_bits=8",
                enabled(),
                None,
            ),
            (
                "permessage-deflate; server_max_window_bits",
                enabled(),
                None,
            ),
            (
                "permessage-deflate; server_max_window_bits=16",
                enabled(),
                None,
            ),
            (
                "permessage-deflate; server_max_window_bits=010",
                enabled(),
                None,
            ),
            (
                "permessage-deflate; client_max_window_bits=7",
                enabled(),
                None,
            ),
            (
                "permessage-deflate; server_no_context_takeover=1",
                enabled(),
                None,
            ),
            (
                "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
                enabled(),
                None,
            ),
            ("permessage-deflate; mystery", enabled(), None),
            ("x-webkit-deflate-frame", enabled(), None),
            ("permessage-deflate", DeflateConfig::default(), None),
            // Invalid first offer declined, the valid second one taken.
            (
                "permessage-deflate; bogus, permessage-deflate; client_max_window_bits=\"9\"",
                with_takeover(),
                Some("permessage-deflate"),
            ),
        ];
        for (header, config, expect) in cases {
            let got = accept(&parse([*header]), config).map(|(r, _)| r);
            assert_eq!(got.as_deref(), *expect, "{header}");
        }
    }

    #[test]
    fn server_params_follow_the_response() {
        let (_, p) = accept(
            &parse(["permessage-deflate; server_max_window_bits=9; client_no_context_takeover"]),
            &with_takeover(),
        )
        .unwrap();
        assert_eq!(p.compress_window_bits, 9);
        assert!(!p.compress_reset && p.decompress_reset);
    }

    #[test]
    fn client_offer_and_response() {
        assert_eq!(offer(&DeflateConfig::default()), None);
        assert_eq!(
            offer(&enabled()).unwrap(),
            "permessage-deflate; client_max_window_bits; server_no_context_takeover; client_no_context_takeover"
        );
        let small = DeflateConfig {
            max_window_bits: 10,
            ..with_takeover()
        };
        assert_eq!(
            offer(&small).unwrap(),
            "permessage-deflate; client_max_window_bits; server_max_window_bits=10"
        );

        assert_eq!(check_response([], &enabled()), Ok(None));
        let p = check_response(
            ["permessage-deflate; server_no_context_takeover; client_max_window_bits=11"],
            &with_takeover(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.compress_window_bits, 11);
        assert!(!p.compress_reset && p.decompress_reset);
        // A server limiting us to 8 bits gets uncompressed messages only.
        let p = check_response(["permessage-deflate; client_max_window_bits=8"], &enabled())
            .unwrap()
            .unwrap();
        assert_eq!(p.compress_window_bits, 8);

        for bad in [
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; server_max_window_bits=12",
            "permessage-deflate; unknown",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate, permessage-deflate",
            "x-other",
            "permessage-deflate; server_max_window_bits=\"1",
        ] {
            assert!(check_response([bad], &small).is_err(), "{bad}");
        }
        assert!(check_response(["permessage-deflate"], &DeflateConfig::default()).is_err());
    }
}
