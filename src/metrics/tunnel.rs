//! The families both roles export from their sessions' counters.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyproxy_proto::{ErrorCode, MessageKind};
use prometheus_client::encoding::DescriptorEncoder;

use super::encode::{counters, gauges, histograms, labels, Labels};
use super::table::{total, Row};
use crate::tunnel::stats::HistogramSnapshot;

pub fn encode(enc: &mut DescriptorEncoder, rows: &[Row]) -> Result<(), std::fmt::Error> {
    let agent = |r: &Row| labels([("group", &r.group), ("agent", &r.agent)]);
    let per_agent = |f: &dyn Fn(&Row) -> f64| -> Vec<(Labels, f64)> {
        rows.iter().map(|r| (agent(r), f(r))).collect()
    };
    gauges(
        enc,
        "tunnel_sessions",
        "Live tunnel sessions (replicas count separately)",
        &per_agent(&|r| r.live.len() as f64),
    )?;
    gauges(
        enc,
        "tunnel_connections_active",
        "Tunnelled connections open or being opened",
        &per_agent(&|r| r.live.iter().map(|c| c.active_conns()).sum::<usize>() as f64),
    )?;
    let opened: Vec<_> = rows
        .iter()
        .map(|r| (agent(r), r.stats.conns_opened))
        .collect();
    counters(
        enc,
        "tunnel_connections_opened",
        "Tunnelled connections established (the agent reached the target)",
        &opened,
    )?;
    let mut bytes = Vec::new();
    for r in rows {
        let mut l = agent(r);
        l.push(("direction", "in".into()));
        bytes.push((l.clone(), r.stats.bytes_in));
        l.pop();
        l.push(("direction", "out".into()));
        bytes.push((l, r.stats.bytes_out));
    }
    counters(
        enc,
        "tunnel_bytes",
        "Bytes relayed; in = read from local sockets (proxy users on the gateway, targets on the agent), out = written to them",
        &bytes,
    )?;

    let all = total(rows);
    let mut msgs = Vec::new();
    for (i, kind) in MessageKind::ALL.iter().enumerate() {
        for (dir, v) in [("rx", all.msgs_rx[i]), ("tx", all.msgs_tx[i])] {
            if v > 0 {
                msgs.push((labels([("direction", dir), ("type", kind.as_str())]), v));
            }
        }
    }
    counters(
        enc,
        "tunnel_messages",
        "Protocol messages processed, by direction and type",
        &msgs,
    )?;
    let errors: Vec<_> = ErrorCode::ALL
        .iter()
        .zip(all.errors_rx)
        .map(|(c, v)| (labels([("code", c.as_str())]), v))
        .collect();
    counters(
        enc,
        "tunnel_peer_errors",
        "error messages received from the peer, by code",
        &errors,
    )?;
    counters(
        enc,
        "tunnel_flow_stalls",
        "Waits for flow control: credit = a relay had data but no send credit (binary); json_reader = a connection's queue went over json_conn_buffer (JSON; the session reader does not wait)",
        &[
            (labels([("kind", "credit")]), all.credit_stalls),
            (labels([("kind", "json_reader")]), all.json_stalls),
        ],
    )?;
    counters(
        enc,
        "tunnel_json_stall_closes",
        "JSON-mode connections closed because their local side stopped reading (queue over json_conn_buffer for stall_timeout, or at twice it)",
        &[(vec![], all.json_stall_closes)],
    )?;
    counters(
        enc,
        "tunnel_idle_timeouts",
        "Tunnelled connections closed after conn_idle_timeout without a byte either way",
        &[(vec![], all.idle_timeouts)],
    )?;

    // Histograms per group: per agent they would multiply the series by the buckets.
    let mut by_group: BTreeMap<Arc<str>, [HistogramSnapshot; 3]> = BTreeMap::new();
    for r in rows {
        let e = by_group.entry(r.group.clone()).or_insert_with(|| {
            [
                HistogramSnapshot::empty(r.stats.connect_time.bounds),
                HistogramSnapshot::empty(r.stats.conn_duration.bounds),
                HistogramSnapshot::empty(r.stats.rtt.bounds),
            ]
        });
        e[0].add(&r.stats.connect_time);
        e[1].add(&r.stats.conn_duration);
        e[2].add(&r.stats.rtt);
    }
    let hist = |i: usize| -> Vec<(Labels, &HistogramSnapshot)> {
        by_group
            .iter()
            .map(|(g, h)| (labels([("group", g)]), &h[i]))
            .collect()
    };
    histograms(
        enc,
        "tunnel_connect_seconds",
        "Time to connect through the agent: from sending connect to its success",
        &hist(0),
    )?;
    histograms(
        enc,
        "tunnel_connection_duration_seconds",
        "How long relayed connections lived",
        &hist(1),
    )?;
    histograms(
        enc,
        "tunnel_heartbeat_rtt_seconds",
        "Heartbeat (ping/pong) round trips",
        &hist(2),
    )?;

    let mut rtt = Vec::new();
    let mut ratio = Vec::new();
    for r in rows {
        for core in &r.live {
            if let Some(d) = core.rtt() {
                rtt.push((agent(r), d.as_secs_f64()));
            }
            if let Some(c) = core.compression_stats().filter(|c| c.wire_bytes > 0) {
                ratio.push((agent(r), c.raw_bytes as f64 / c.wire_bytes as f64));
            }
        }
    }
    gauges(
        enc,
        "tunnel_rtt_seconds",
        "Smoothed heartbeat round trip of each live session",
        &rtt,
    )?;
    gauges(
        enc,
        "tunnel_compression_ratio",
        "permessage-deflate: payload bytes before / after compression, live compressed sessions",
        &ratio,
    )?;
    Ok(())
}
