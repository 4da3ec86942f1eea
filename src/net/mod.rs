//! The neutral vocabulary every layer shares, and that imports no other part of the
//! crate: targets (`HostPort`), IP networks (`Cidr`), human-readable units, secrets and
//! their constant-time comparison, percent-encoding, the typed reasons a dial fails,
//! and the service manager's readiness protocol (`notify`).

mod addr;
mod cidr;
mod failure;
mod fingerprint;
pub mod notify;
mod percent;
mod revoke;
mod secret;
mod units;

pub use addr::{HostPort, InvalidTarget, MAX_HOST_LEN};
pub use cidr::{canonical, Cidr};
pub use failure::FailureKind;
pub use fingerprint::Fingerprint;
pub use percent::{percent_decode, percent_encode};
pub use revoke::Revoke;
pub use secret::{credentials_match, secret_eq, Credentials, Secret};
pub use units::{parse_duration, parse_size, ByteRate, ByteSize, HumanDuration};
