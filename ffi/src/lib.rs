//! Bindings to C libraries (DPDK), each behind a cargo feature so the default build needs
//! none of them.
//!
//! No binding exists yet; see `docs/ARCHITECTURE.md`.

#![forbid(unsafe_code)]
