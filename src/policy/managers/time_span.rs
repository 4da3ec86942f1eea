//! `timeSpan`: a window that repeats (the upstream's `rtimespan.RSpan`).
//!
//! From `start`, cycles of length `total` follow each other; the first `active` of each
//! cycle is inside. `times` cycles count, or all of them with `infinite`; `allTime`
//! makes every instant inside. Unlike the upstream, this is evaluated inside rules, and a
//! zero `total` is a configuration error instead of a division by zero.

use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::policy::config::TimeSpanConf;
use crate::policy::error::{At, PolicyConfigError};

#[derive(Debug, Clone)]
pub struct TimeSpan {
    start_ns: i128,
    active_ns: i128,
    total_ns: i128,
    times: i128,
    infinite: bool,
    all_time: bool,
}

pub fn unix_ns(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// RFC 3339, plus the manual's example spelling `2006-01-02-T08:00:00-04:00`.
pub fn parse_instant(s: &str) -> Option<OffsetDateTime> {
    let fixed = s.trim().replacen("-T", "T", 1);
    OffsetDateTime::parse(&fixed, &Rfc3339).ok()
}

impl TimeSpan {
    pub fn from_conf(file: &str, c: &TimeSpanConf) -> Result<TimeSpan, PolicyConfigError> {
        let at = At {
            file,
            section: "[[timeSpan]]",
            name: &c.name,
        };
        let s = &c.span;
        if s.all_time {
            return Ok(TimeSpan {
                start_ns: 0,
                active_ns: 0,
                total_ns: 1,
                times: 0,
                infinite: true,
                all_time: true,
            });
        }
        let start = match &s.start {
            Some(toml::Value::Datetime(d)) => parse_instant(&d.to_string())
                .ok_or_else(|| at.err("span.start", format!("{d}: needs a date, a time with seconds and an offset (e.g. 2024-01-01T08:00:00-04:00)")))?,
            Some(toml::Value::String(t)) => parse_instant(t)
                .ok_or_else(|| at.err("span.start", format!("{t:?} is not an RFC 3339 date-time with offset")))?,
            Some(other) => return Err(at.err("span.start", format!("expected a date-time, found {other}"))),
            None => return Err(at.err("span.start", "missing (or set allTime = true)")),
        };
        let active = s.active.ok_or_else(|| at.err("span.active", "missing"))?.0;
        let total = s.total.ok_or_else(|| at.err("span.total", "missing"))?.0;
        if total.is_zero() {
            return Err(at.err("span.total", "must be longer than 0"));
        }
        if active > total {
            return Err(at.err(
                "span.active",
                format!("{active:?} is longer than total {total:?}"),
            ));
        }
        if s.times < 0 {
            return Err(at.err("span.times", "must not be negative"));
        }
        if s.times == 0 && !s.infinite {
            return Err(at.err(
                "span.times",
                "0 without infinite = true: the span would never be active",
            ));
        }
        Ok(TimeSpan {
            start_ns: start.unix_timestamp_nanos(),
            active_ns: active.as_nanos() as i128,
            total_ns: total.as_nanos() as i128,
            times: s.times as i128,
            infinite: s.infinite,
            all_time: false,
        })
    }

    pub fn contains(&self, t: SystemTime) -> bool {
        if self.all_time {
            return true;
        }
        let p = unix_ns(t) - self.start_ns;
        if p < 0 {
            return false;
        }
        let cycle = p / self.total_ns;
        (self.infinite || cycle < self.times) && p % self.total_ns < self.active_ns
    }
}

/// A fixed instant for tests, from RFC 3339.
#[cfg(test)]
pub fn at(s: &str) -> SystemTime {
    let t = parse_instant(s).unwrap();
    UNIX_EPOCH + std::time::Duration::from_nanos(t.unix_timestamp_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(body: &str) -> Result<TimeSpan, PolicyConfigError> {
        let c: TimeSpanConf = toml::from_str(&format!("name = \"day\"\n[span]\n{body}")).unwrap();
        TimeSpan::from_conf("managers.toml", &c)
    }

    #[test]
    fn repeating_window() {
        let s =
            span("start = 2024-01-01T08:00:00-04:00\nactive = \"12h\"\ntotal = \"24h\"\ntimes = 2")
                .unwrap();
        assert!(!s.contains(at("2024-01-01T07:59:59-04:00")));
        assert!(s.contains(at("2024-01-01T08:00:00-04:00")));
        assert!(s.contains(at("2024-01-01T19:59:59-04:00")));
        assert!(!s.contains(at("2024-01-01T20:00:00-04:00")));
        assert!(s.contains(at("2024-01-02T09:00:00-04:00")));
        // The third day is past `times`.
        assert!(!s.contains(at("2024-01-03T09:00:00-04:00")));
        let forever = span("start = \"2024-01-01-T08:00:00-04:00\"\nactive = \"12h\"\ntotal = \"24h\"\ninfinite = true").unwrap();
        assert!(forever.contains(at("2030-06-01T09:00:00-04:00")));
        assert!(span("allTime = true")
            .unwrap()
            .contains(at("1990-01-01T00:00:00Z")));
    }

    #[test]
    fn bad_spans_are_config_errors() {
        let cases = [
            (
                "active = \"1h\"\ntotal = \"0s\"\ninfinite = true\nstart = 2024-01-01T00:00:00Z",
                "span.total: must be longer than 0",
            ),
            (
                "active = \"2h\"\ntotal = \"1h\"\ninfinite = true\nstart = 2024-01-01T00:00:00Z",
                "span.active",
            ),
            (
                "active = \"1h\"\ntotal = \"2h\"\nstart = 2024-01-01T00:00:00Z",
                "span.times",
            ),
            (
                "active = \"1h\"\ntotal = \"2h\"\ninfinite = true",
                "span.start: missing",
            ),
            (
                "active = \"1h\"\ntotal = \"2h\"\ninfinite = true\nstart = 2024-01-01T00:00:00",
                "span.start",
            ),
        ];
        for (body, want) in cases {
            let e = span(body).err().unwrap().to_string();
            assert!(
                e.starts_with("managers.toml: [[timeSpan]] \"day\": "),
                "{e}"
            );
            assert!(e.contains(want), "{e}");
        }
    }
}
