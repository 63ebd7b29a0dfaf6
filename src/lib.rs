//! maqet: a per-user QEMU VM manager. `maqetd` (the D-Bus session service) and `maqet`
//! (its CLI) are thin binaries over this library; see `docs/architecture.md`.

pub mod access;
pub mod agent;
pub mod child;
pub mod cli;
pub mod client;
pub mod config;
pub mod doctor;
pub mod error;
pub mod error_kind;
pub mod events;
pub mod fdio;
pub mod host;
pub mod images;
pub mod jobs;
pub mod lines;
pub mod log_limit;
pub mod logging;
pub mod manager;
pub mod notify;
pub mod outbound;
pub mod paths;
pub mod qmp;
pub mod service;
pub mod session;
pub mod settings;
pub mod snapshot;
pub mod storage;
pub mod store;
pub mod time;
pub mod vm;

/// The rule for tests that need something this machine may lack: skip, or fail with
/// `MAQET_TEST_REQUIRE_ALL=1`. One file, shared with the end-to-end tests.
#[cfg(test)]
#[path = "../tests/common/require.rs"]
#[allow(dead_code)]
pub(crate) mod require;
#[cfg(test)]
#[path = "../tests/common/require_tests.rs"]
mod require_tests;
