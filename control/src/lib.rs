//! The control plane: `sluice-mon` (Raft quorum holding the cluster maps) and the
//! `sluice` CLI.
//!
//! Built so far: the cluster maps ([`maps`]): the OSD map with epochs and incrementals,
//! and the versioned, checksummed envelope they are stored and sent in. The Raft quorum,
//! the monitor daemon, the management API and the CLI build on them; see
//! `docs/ARCHITECTURE.md` for what exists today.

#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod conf;
pub mod maps;
pub mod mon;
pub mod monclient;
pub mod osd_agent;
pub mod raft;
pub mod state;
pub mod store;
