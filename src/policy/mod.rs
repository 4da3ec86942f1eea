//! The policy engine (PMProxy): a predicate over named managers decides every request.

pub mod rule;
