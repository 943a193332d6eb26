//! cordon: a hardened container entrypoint for AI coding agents. See `docs/architecture.md`
//! for the map. The layers, from the bottom: `sys` (every libc call), `config` (pure),
//! `mounts`, `egress` and `session` (the effects of each part of the lockdown), `state` (what
//! is reported), `boot` (the stage script), `supervise` (the two processes) and `cli` (the
//! subcommands). A module imports only from the layers below it.

mod boot;
pub mod cli;
pub mod config;
pub mod egress;
mod fix;
pub mod mounts;
mod service;
pub mod session;
pub mod state;
pub mod supervise;
pub mod sys;
