//! cordon: a hardened container entrypoint for AI coding agents. See `docs/architecture.md`.

pub mod addrs;
pub mod admission;
pub mod agent;
pub mod allowlist;
pub mod attach;
pub mod boot;
pub mod check;
pub mod clone;
pub mod config;
pub mod control;
pub mod credentials;
pub mod dns;
pub mod egress;
pub mod firewall;
pub mod ipset;
pub mod mounts;
pub mod namebound;
pub mod probe;
pub mod reaper;
pub mod report;
pub mod secrets;
pub mod session;
pub mod status;
pub mod supervisor;
pub mod sys;
pub mod users;
