//! Checking what a chaos run recorded: the history format ([`history`]) and the
//! verdict on it ([`check`]): no acknowledged write lost, each key's history
//! linearizable, no damaged bytes.

pub mod check;
pub mod history;

pub use check::{Limits, Lost, Verdict, Violation, check};
pub use history::{Call, Header, History, Op, Outcome};
