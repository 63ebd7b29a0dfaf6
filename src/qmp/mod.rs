//! QEMU Machine Protocol (QMP): everything maqet says to a running QEMU goes through here.
//!
//! This module owns the wire protocol and nothing above it: [`QmpClient`] performs the
//! greeting and capabilities negotiation, matches command replies to requests by `id`,
//! and forwards asynchronous events, in order, to one channel. Which commands to send and
//! what an event means for a VM's lifecycle belong to the VM supervisor. [`keys`] turns
//! key names and text into `send-key` arguments; [`classify`] holds the one table of
//! which commands a D-Bus caller may pass through, and under which policy action.
//!
//! The client is hand-written against QEMU 7.2's QMP (see `docs/interop/qmp-spec`); the
//! schema-generated crates target newer QEMU releases (STACK.md).

pub mod classify;
mod client;
mod error;
pub mod keys;
pub mod limits;
mod wire;

pub use client::QmpClient;
pub use error::QmpError;
pub use wire::{Greeting, QmpEvent};
