//! The QEMU guest agent (qemu-ga) protocol, from the host side.
//!
//! qemu-ga runs inside the guest and talks JSON over a virtio-serial port whose host end
//! is a unix socket. Unlike QMP it has no greeting, no events and no request ids: one
//! request, one reply, in order. The stream can hold stale replies (a request that timed
//! out) or garbage (an agent killed mid-reply), so the client resynchronises with
//! `guest-sync-delimited` before the first request and after anything went wrong.
//!
//! The guest is untrusted: replies are size-capped, parsed leniently, and a malformed one
//! is an error, never a panic. [`AgentClient`] owns the framing; [`commands`] turns the
//! agent's commands into typed calls (exec, files, addresses, shutdown, fsfreeze).

mod base64;
mod client;
pub mod commands;
mod error;
mod wire;

pub use client::{AgentClient, Limits};
pub use commands::{Address, ExecOutput, GuestInfo};
pub use error::AgentError;

/// The virtio-serial port name qemu-ga opens by default.
pub const PORT_NAME: &str = "org.qemu.guest_agent.0";
