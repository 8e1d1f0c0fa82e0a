//! The control plane: `sluice-mon` (Raft quorum holding the cluster maps) and the
//! `sluice` CLI.
//!
//! * [`maps`], [`state`]: the cluster maps and the replicated state machine;
//! * [`raft`], [`store`], [`mon`]: the monitor (`sluice-mon`): openraft over the redb
//!   store, the management API, the failure detector;
//! * [`api`], [`client`], [`monclient`], [`conf`]: what clients of the monitors share;
//! * [`osd_agent`]: the OSD's side of the lifecycle, run by `sluice-osd`;
//! * [`pgstats`]: PG states as the monitors see them, from the OSDs' reports.
//!
//! `docs/ARCHITECTURE.md` describes each part; `docs/api.md` the HTTP API.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod client;
pub mod conf;
pub mod maps;
pub mod mon;
pub mod monclient;
pub mod osd_agent;
pub mod pgstats;
pub mod raft;
pub mod state;
pub mod store;

/// Logs to stderr for every Sluice program, filtered by `$SLUICE_LOG` (tracing's
/// `EnvFilter` syntax, e.g. `debug` or `info,sluice_net=trace`), else by `default`.
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
