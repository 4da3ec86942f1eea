//! UDP on the gateway: the [`DatagramConnector`]s that open datagram flows through the
//! agents of a user's group ([`TunnelDatagrams`]) or through the one agent that asked
//! for a forward ([`AgentDatagrams`]), both behind the limits, which count each flow
//! as a connection; and the UDP forwards (`forwards` and agents' `open_ports` with
//! `protocol: udp`): one flow per client address, to the forward's target.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyproxy_proto::ErrorCode;
use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::registry::{AgentHandle, AgentRegistry};
use super::MAX_ATTEMPTS;
use crate::auth::Identity;
use crate::connect::{ConnectError, Requester};
use crate::limits::Limits;
use crate::metrics::GatewayMetrics;
use crate::net::HostPort;
use crate::policy::Policy;
use crate::proxy::socks5_udp::{
    DatagramConnector, DatagramUpstream, Destination, OpenFuture, Reply, Route, UdpSupport,
    MAX_FLOWS_PER_ASSOCIATION,
};
use crate::tunnel::datagram::{DatagramLimits, DropReason, MAX_UDP_PAYLOAD};
use crate::tunnel::OpenError;

/// Opens datagram flows through the least-loaded live agent of the user's group, once
/// the policy (when there is one) allowed the flow's destination, by the same rules
/// as a TCP request, and the limits admitted it.
pub struct TunnelDatagrams {
    registry: Arc<AgentRegistry>,
    policy: Option<Arc<Policy>>,
    settings: UdpSettings,
}

impl TunnelDatagrams {
    async fn open_flow(
        &self,
        target: &HostPort,
        who: &Requester,
    ) -> Result<DatagramUpstream, ConnectError> {
        target.validate()?;
        let allowed = match &self.policy {
            Some(policy) => Some(crate::policy::decide(policy, target, who)?),
            None => None,
        };
        let who = match &allowed {
            Some(a) => a.requester(who),
            None => who.clone(),
        };
        let s = &self.settings;
        let grant = s.limits.admit(&who).await?;
        let mut tried = Vec::with_capacity(MAX_ATTEMPTS);
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            let Some(agent) = self.registry.pick(&who.group, &tried) else {
                break;
            };
            tried.push(agent.serial);
            match s.open_on(&agent, target).await {
                Ok(flow) => {
                    let mut up = DatagramUpstream::new(flow, grant);
                    if let Some(a) = allowed {
                        up.quota = a.quota();
                        up.verdict = Some(a.verdict);
                    }
                    return Ok(up);
                }
                Err(OpenError::SessionClosed) => {}
                Err(OpenError::Failed(f)) if f.code == ErrorCode::RateLimited => {
                    last = Some(ConnectError::from(f));
                }
                Err(e) => return Err(ConnectError::from(e)),
            }
        }
        Err(last.unwrap_or_else(|| ConnectError::NoAgent(who.group.to_string())))
    }
}

impl DatagramConnector for TunnelDatagrams {
    fn open<'a>(&'a self, target: &'a HostPort, who: &'a Requester) -> OpenFuture<'a> {
        Box::pin(self.settings.counted(who, self.open_flow(target, who)))
    }
}

/// What every datagram flow of the gateway shares: the caps, how long an agent may
/// take to open a flow, the flows' limits, the idle timeout, and the metrics (drops,
/// and flows refused, counted as the proxy requests not connected).
#[derive(Clone)]
pub struct UdpSettings {
    pub limits: Arc<Limits>,
    pub connect_timeout: Duration,
    pub flow_limits: DatagramLimits,
    pub idle_timeout: Duration,
    pub metrics: Arc<GatewayMetrics>,
}

impl UdpSettings {
    /// UDP support whose flows go through the least-loaded agent of a user's group,
    /// decided by `policy` first when there is one.
    pub fn through_groups(
        &self,
        registry: Arc<AgentRegistry>,
        policy: Option<Arc<Policy>>,
    ) -> Arc<UdpSupport> {
        self.support(Arc::new(TunnelDatagrams {
            registry,
            policy,
            settings: self.clone(),
        }))
    }

    /// UDP support whose flows all go through `agent`'s session (its own forward).
    pub fn through_agent(&self, agent: Arc<AgentHandle>) -> Arc<UdpSupport> {
        self.support(Arc::new(AgentDatagrams {
            agent,
            settings: self.clone(),
        }))
    }

    fn support(&self, connector: Arc<dyn DatagramConnector>) -> Arc<UdpSupport> {
        Arc::new(UdpSupport {
            connector,
            idle_timeout: self.idle_timeout,
            stats: self.metrics.udp.clone(),
        })
    }

    /// Opens a flow to `target` on `agent`'s session.
    async fn open_on(
        &self,
        agent: &AgentHandle,
        target: &HostPort,
    ) -> Result<crate::tunnel::datagram::DatagramFlow, OpenError> {
        agent
            .core
            .open_datagram(
                &target.host,
                target.port,
                self.connect_timeout,
                self.flow_limits,
                self.metrics.udp.clone(),
            )
            .await
    }

    /// `open`, with a refusal counted by group, code and reason.
    async fn counted(
        &self,
        who: &Requester,
        open: impl std::future::Future<Output = Result<DatagramUpstream, ConnectError>>,
    ) -> Result<DatagramUpstream, ConnectError> {
        let r = open.await;
        if let Err(e) = &r {
            self.metrics.connect_failed(&who.group, e);
        }
        r
    }
}

/// Opens datagram flows through one agent's session (an agent's UDP forward), once
/// the per-address limits admitted the flow. No other agent is tried: the forward is
/// that agent's. No policy either: forwards are the operator's own routes.
pub struct AgentDatagrams {
    agent: Arc<AgentHandle>,
    settings: UdpSettings,
}

impl AgentDatagrams {
    async fn open_flow(
        &self,
        target: &HostPort,
        who: &Requester,
    ) -> Result<DatagramUpstream, ConnectError> {
        let grant = self.settings.limits.admit(who).await?;
        let flow = self.settings.open_on(&self.agent, target).await?;
        Ok(DatagramUpstream::new(flow, grant))
    }
}

impl DatagramConnector for AgentDatagrams {
    fn open<'a>(&'a self, target: &'a HostPort, who: &'a Requester) -> OpenFuture<'a> {
        Box::pin(self.settings.counted(who, self.open_flow(target, who)))
    }
}

/// Serves one UDP forward on `socket` until `stop`: each client address is one flow
/// to `target` through an agent of `group`, ended after the idle timeout.
pub async fn serve_forward(
    socket: Arc<UdpSocket>,
    group: Arc<str>,
    target: HostPort,
    support: Arc<UdpSupport>,
    stop: CancellationToken,
) {
    let flows_stop = stop.child_token();
    let _end_flows = flows_stop.clone().drop_guard();
    let mut clients: HashMap<SocketAddr, Destination> = HashMap::new();
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
    loop {
        // Stop first: a reload that replaced this forward hands the socket on.
        let (n, src) = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // An ICMP error for an earlier reply: the client is gone, UDP carries on.
                Err(_) => continue,
            },
        };
        if clients.get(&src).is_none_or(Destination::is_gone) {
            clients.retain(|_, c| !c.is_gone());
            if clients.len() >= MAX_FLOWS_PER_ASSOCIATION * 16 {
                support.stats.dropped(DropReason::Refused);
                continue;
            }
            let who = Requester::new(
                src,
                Identity {
                    user: None,
                    group: group.clone(),
                },
            );
            let route = Route {
                proto: "forward-udp",
                target: target.clone(),
                header: Bytes::new(),
                who: Arc::new(who),
                reply: Reply::To(src),
            };
            let dest =
                Destination::spawn(route, support.clone(), socket.clone(), flows_stop.clone());
            clients.insert(src, dest);
        }
        if let Some(c) = clients.get(&src) {
            c.push(Bytes::copy_from_slice(&buf[..n]), &support.stats);
        }
    }
}
