//! The control plane: `sluice-mon` (Raft quorum holding the cluster maps) and the
//! `sluice` CLI.
//!
//! * [`maps`], [`state`]: the cluster maps and the replicated state machine;
//! * [`raft`], [`store`], [`mon`]: the monitor (`sluice-mon`): openraft over the redb
//!   store, the management API, the failure detector;
//! * [`api`], [`client`], [`monclient`], [`conf`]: what clients of the monitors share;
//! * [`osd_agent`]: the OSD's side of the lifecycle, run by `sluice-osd`.
//!
//! `docs/ARCHITECTURE.md` describes each part; `docs/api.md` the HTTP API.

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
