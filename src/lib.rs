//! maqet: a per-user QEMU VM manager. `maqetd` (the D-Bus session service) and `maqet`
//! (its CLI) are thin binaries over this library; see `docs/architecture.md`.

pub mod access;
pub mod child;
pub mod cli;
pub mod client;
pub mod config;
pub mod doctor;
pub mod error;
pub mod events;
pub mod fdio;
pub mod host;
pub mod jobs;
pub mod log_limit;
pub mod logging;
pub mod manager;
pub mod notify;
pub mod outbound;
pub mod paths;
pub mod qmp;
pub mod service;
pub mod settings;
pub mod snapshot;
pub mod storage;
pub mod store;
pub mod time;
pub mod vm;
