//! The cluster maps the monitors replicate, and the envelope they travel in.

pub mod envelope;
pub mod osdmap;
pub mod placement;

pub use envelope::{EnvelopeError, Kind};
pub use osdmap::{
    Change, FailureDomain, Flag, Flags, Incremental, Location, Maintenance, MapError, OsdAddrs,
    OsdId, OsdInfo, OsdMap, Pool, PoolId,
};
pub use placement::{PgId, PgMapping};
