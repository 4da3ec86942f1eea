//! Limits on what clients may do. For now the brute-force lockout (`throttle`) shared
//! by agent authentication and the policy API's logins.

pub mod throttle;

pub use throttle::AuthThrottle;
