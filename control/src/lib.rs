//! The control plane: `sluice-mon` (Raft quorum holding the cluster maps) and the
//! `sluice` CLI.
//!
//! Empty until the control-plane work lands; see `docs/ARCHITECTURE.md` for what exists
//! today.

#![forbid(unsafe_code)]
