//! Operations: the Prometheus families built at scrape time from the counters the
//! tunnel keeps (`crate::tunnel::stats`) (`tunnel`, `gateway`, `agent`, `process`), and the admin
//! listener with `/metrics`, health checks, `/api/status` and the status page
//! (`admin`, `status`, `page/`). See `docs/STATUS.md`.

pub mod admin;
pub mod agent;
mod encode;
pub mod gateway;
pub mod links;
pub mod process;
pub mod status;
pub mod table;
mod tunnel;
pub mod udp;

pub use admin::{AdminError, Observed};
pub use agent::AgentMetrics;
pub use gateway::{AgentDirectory, AgentSession, GatewayMetrics, MeteredConnector};
