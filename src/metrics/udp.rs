//! The UDP families both roles export: datagram flows open and opened, datagrams and
//! bytes each way, and drops by reason.

use prometheus_client::encoding::DescriptorEncoder;

use super::encode::{counters, gauges, labels};
use crate::tunnel::datagram::{DropReason, UdpStats};

pub fn encode(enc: &mut DescriptorEncoder, stats: &UdpStats) -> Result<(), std::fmt::Error> {
    let none = || labels([]);
    gauges(
        enc,
        "udp_flows_active",
        "Datagram flows open (one per SOCKS5 association and destination, or forward client)",
        &[(none(), stats.active() as f64)],
    )?;
    counters(
        enc,
        "udp_flows_opened",
        "Datagram flows established (the agent opened its UDP socket)",
        &[(none(), UdpStats::get(&stats.flows_opened))],
    )?;
    let dir = |d: &str| labels([("direction", d)]);
    counters(
        enc,
        "udp_datagrams",
        "Datagrams carried; in = read from local sockets (users on the gateway, targets on the agent) and sent through the tunnel, out = delivered to them",
        &[
            (dir("in"), UdpStats::get(&stats.datagrams_in)),
            (dir("out"), UdpStats::get(&stats.datagrams_out)),
        ],
    )?;
    counters(
        enc,
        "udp_bytes",
        "Datagram payload bytes carried, as udp_datagrams",
        &[
            (dir("in"), UdpStats::get(&stats.bytes_in)),
            (dir("out"), UdpStats::get(&stats.bytes_out)),
        ],
    )?;
    let drops: Vec<_> = DropReason::ALL
        .iter()
        .map(|r| (labels([("reason", r.as_str())]), stats.drops(*r)))
        .collect();
    counters(
        enc,
        "udp_dropped",
        "Datagrams dropped, by reason (UDP is never queued without bound nor waited for)",
        &drops,
    )
}
