//! Multi-process tests of Sluice on loopback live in `tests/tests/`. This library holds
//! the helpers they share.

#![forbid(unsafe_code)]
