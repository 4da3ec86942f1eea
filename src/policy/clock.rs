//! Time as a dependency, so windows, cycles and token expiry can be tested at fixed instants.

use std::time::SystemTime;

use parking_lot::Mutex;

pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to.
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn new(at: SystemTime) -> ManualClock {
        ManualClock(Mutex::new(at))
    }

    pub fn set(&self, at: SystemTime) {
        *self.0.lock() = at;
    }

    pub fn advance(&self, by: std::time::Duration) {
        let mut t = self.0.lock();
        *t += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock()
    }
}
