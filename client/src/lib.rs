//! The Sluice client library: placement, routing, retries, auth.
//!
//! Empty until the serving path lands; see `docs/ARCHITECTURE.md` for what exists today.

#![forbid(unsafe_code)]
