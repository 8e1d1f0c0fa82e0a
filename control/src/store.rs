//! The monitor's durable store (lesson 2: never lose state on recovery).
//!
//! One redb file per monitor, `DIR/mon.redb`: ACID transactions with an fsync per
//! commit, so the identity, the replicated state snapshot, the Raft vote and log entries
//! change together or not at all. Every value is sealed in the versioned crc32c envelope
//! as well, so a damaged value is detected even where redb's own checks would not look.
//!
//! Opening never creates anything: a missing store is [`StoreError::NotInitialized`]
//! (`sluice-mon mkfs` makes one), and an unreadable or damaged one is retried with
//! backoff a bounded number of times and then reported, naming the file and what failed.
//! Nothing here ever starts empty in place of a store it could not read, or deletes
//! state because reading it failed.

// redb's error type is large; these results are on the cold (storage) path.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::maps::envelope::{self, Kind};
use crate::state::{ClusterState, STATE_VERSION};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");

const IDENTITY: &str = "identity";
const STATE: &str = "state";
const VOTE: &str = "vote";
/// Raft bookkeeping beside the state (all opaque to this module, sealed like the rest).
pub(crate) const APPLIED: &str = "applied";
pub(crate) const PURGED: &str = "purged";
pub(crate) const COMMITTED: &str = "committed";
pub(crate) const SNAPSHOT: &str = "snapshot";

/// Format version of the values this module seals.
pub const VERSION: u16 = 1;

pub const FILE_NAME: &str = "mon.redb";

/// The state, sealed in its current format (readers of format 1 cannot read it: its
/// layout inside snapshots is not a prefix of theirs).
fn seal_state(state: &ClusterState) -> Vec<u8> {
    envelope::seal(Kind::MonState, STATE_VERSION, STATE_VERSION, state)
}

/// Who this monitor is; written once by mkfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub fsid: [u8; 16],
    /// This monitor's name (e.g. `a`).
    pub name: String,
    /// The initial members, name and address, in order.
    pub initial_members: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: no monitor store here (create one with `sluice-mon mkfs`)")]
    NotInitialized { path: PathBuf },
    #[error(
        "{path}: a monitor store exists already (for cluster {fsid}); refusing to overwrite it"
    )]
    AlreadyInitialized { path: PathBuf, fsid: String },
    #[error("{path}: {what}: {detail} (after {attempts} attempts; the store was left untouched)")]
    Unreadable { path: PathBuf, what: &'static str, detail: String, attempts: u32 },
    #[error("{path}: {what}: {detail}")]
    Failed { path: PathBuf, what: &'static str, detail: String },
}

/// How hard to try before reporting an unreadable store.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    pub retries: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            retries: 5,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }
}

#[derive(Debug)]
pub struct MonStore {
    db: Database,
    path: PathBuf,
    identity: Identity,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl MonStore {
    /// Creates the store in `dir` (created if missing) with `identity` and the initial
    /// state. Refuses if a store is already there.
    pub fn create(
        dir: &Path,
        identity: &Identity,
        state: &ClusterState,
    ) -> Result<MonStore, StoreError> {
        let path = dir.join(FILE_NAME);
        let failed = |what: &'static str, e: &dyn std::fmt::Display| StoreError::Failed {
            path: path.clone(),
            what,
            detail: e.to_string(),
        };
        if path.exists() {
            let fsid = MonStore::open(dir, OpenOptions { retries: 0, ..Default::default() })
                .map(|s| hex(&s.identity.fsid))
                .unwrap_or_else(|_| "unreadable".into());
            return Err(StoreError::AlreadyInitialized { path, fsid });
        }
        std::fs::create_dir_all(dir).map_err(|e| failed("creating the directory", &e))?;
        let db = Database::create(&path).map_err(|e| failed("creating the database", &e))?;
        let tx = db.begin_write().map_err(|e| failed("starting a transaction", &e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| failed("creating tables", &e))?;
            meta.insert(
                IDENTITY,
                envelope::seal(Kind::MonIdentity, VERSION, VERSION, identity).as_slice(),
            )
            .map_err(|e| failed("writing the identity", &e))?;
            meta.insert(STATE, seal_state(state).as_slice())
                .map_err(|e| failed("writing the initial state", &e))?;
            tx.open_table(LOG).map_err(|e| failed("creating tables", &e))?;
        }
        tx.commit().map_err(|e| failed("committing", &e))?;
        Ok(MonStore { db, path, identity: identity.clone() })
    }

    /// Opens the store in `dir`, retrying per `opts` when it cannot be read.
    pub fn open(dir: &Path, opts: OpenOptions) -> Result<MonStore, StoreError> {
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            return Err(StoreError::NotInitialized { path });
        }
        let mut backoff = opts.backoff_initial;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match MonStore::try_open(&path) {
                Ok(s) => return Ok(s),
                Err((what, detail)) if attempt > opts.retries => {
                    return Err(StoreError::Unreadable { path, what, detail, attempts: attempt });
                }
                Err((what, detail)) => {
                    log::warn!("{}: {what}: {detail}; retrying in {backoff:?}", path.display());
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(opts.backoff_max);
                }
            }
        }
    }

    fn try_open(path: &Path) -> Result<MonStore, (&'static str, String)> {
        let db = Database::open(path).map_err(|e| ("opening the database", e.to_string()))?;
        let identity = {
            let tx = db.begin_read().map_err(|e| ("reading", e.to_string()))?;
            let meta =
                tx.open_table(META).map_err(|e| ("opening the meta table", e.to_string()))?;
            let v = meta
                .get(IDENTITY)
                .map_err(|e| ("reading the identity", e.to_string()))?
                .ok_or(("reading the identity", "missing".to_string()))?;
            envelope::open::<Identity>(Kind::MonIdentity, VERSION, v.value())
                .map_err(|e| ("decoding the identity", e.to_string()))?
        };
        let s = MonStore { db, path: path.to_path_buf(), identity };
        // The state must be readable too: a monitor that cannot read it must not run.
        s.load_state().map_err(|e| ("reading the state", e.to_string()))?;
        Ok(s)
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn failed(&self, what: &'static str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Failed { path: self.path.clone(), what, detail: e.to_string() }
    }

    fn get_meta(&self, key: &str, what: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.failed(what, e))?;
        let meta = tx.open_table(META).map_err(|e| self.failed(what, e))?;
        let v = meta.get(key).map_err(|e| self.failed(what, e))?;
        Ok(v.map(|g| g.value().to_vec()))
    }

    /// The last saved state. Its absence or damage is an error, never an empty state.
    pub fn load_state(&self) -> Result<ClusterState, StoreError> {
        let v = self
            .get_meta(STATE, "reading the state")?
            .ok_or_else(|| self.failed("reading the state", "missing"))?;
        envelope::open_versioned(Kind::MonState, STATE_VERSION, &v, crate::state::decode_state)
            .map_err(|e| self.failed("decoding the state", e))
    }

    /// Saves `state` together with the Raft log position it reflects, durably.
    pub fn save_state(&self, state: &ClusterState) -> Result<(), StoreError> {
        let sealed = seal_state(state);
        self.write(|tx| {
            tx.open_table(META)?.insert(STATE, sealed.as_slice())?;
            Ok(())
        })
    }

    /// Saves `state` and the Raft position it reflects (`applied`, opaque here) in one
    /// durable transaction, plus `snapshot` when given.
    pub fn save_applied(
        &self,
        state: &ClusterState,
        applied: &[u8],
        snapshot: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let sealed = seal_state(state);
        let applied = envelope::seal(Kind::MonLog, VERSION, VERSION, &applied.to_vec());
        let snapshot =
            snapshot.map(|b| envelope::seal(Kind::MonLog, VERSION, VERSION, &b.to_vec()));
        self.write(|tx| {
            let mut meta = tx.open_table(META)?;
            meta.insert(STATE, sealed.as_slice())?;
            meta.insert(APPLIED, applied.as_slice())?;
            if let Some(s) = &snapshot {
                meta.insert(SNAPSHOT, s.as_slice())?;
            }
            Ok(())
        })
    }

    /// Saves an opaque, sealed record under `key` of the meta table, durably.
    pub fn save_record(&self, key: &'static str, bytes: &[u8]) -> Result<(), StoreError> {
        let sealed = envelope::seal(Kind::MonLog, VERSION, VERSION, &bytes.to_vec());
        self.write(|tx| {
            tx.open_table(META)?.insert(key, sealed.as_slice())?;
            Ok(())
        })
    }

    /// The record saved under `key`; damage is an error, absence is `None`.
    pub fn load_record(&self, key: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.get_meta(key, "reading a record")? {
            None => Ok(None),
            Some(v) => envelope::open(Kind::MonLog, VERSION, &v)
                .map(Some)
                .map_err(|e| self.failed("decoding a record", format!("{key}: {e}"))),
        }
    }

    /// The last log entry, if any.
    pub fn last_log(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let what = "reading the log";
        let tx = self.db.begin_read().map_err(|e| self.failed(what, e))?;
        let t = tx.open_table(LOG).map_err(|e| self.failed(what, e))?;
        let Some((k, v)) = t.last().map_err(|e| self.failed(what, e))? else {
            return Ok(None);
        };
        let e = envelope::open::<Vec<u8>>(Kind::MonLog, VERSION, v.value()).map_err(|e| {
            self.failed("decoding a log entry", format!("entry {}: {e}", k.value()))
        })?;
        Ok(Some((k.value(), e)))
    }

    /// Removes entries with index <= `upto` and records `purged` (opaque), in one
    /// transaction.
    pub fn purge_log_through(&self, upto: u64, purged: &[u8]) -> Result<(), StoreError> {
        let sealed = envelope::seal(Kind::MonLog, VERSION, VERSION, &purged.to_vec());
        self.write(|tx| {
            let mut t = tx.open_table(LOG)?;
            let keys: Vec<u64> =
                t.range(0..=upto)?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<_, _>>()?;
            for k in keys {
                t.remove(k)?;
            }
            tx.open_table(META)?.insert(PURGED, sealed.as_slice())?;
            Ok(())
        })
    }

    pub fn save_vote(&self, vote: &[u8]) -> Result<(), StoreError> {
        let sealed = envelope::seal(Kind::MonLog, VERSION, VERSION, &vote.to_vec());
        self.write(|tx| {
            tx.open_table(META)?.insert(VOTE, sealed.as_slice())?;
            Ok(())
        })
    }

    pub fn load_vote(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match self.get_meta(VOTE, "reading the vote")? {
            None => Ok(None),
            Some(v) => envelope::open(Kind::MonLog, VERSION, &v)
                .map(Some)
                .map_err(|e| self.failed("decoding the vote", e)),
        }
    }

    /// Appends (or overwrites) log entries, all in one durable transaction.
    pub fn append_log(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(LOG)?;
            for (i, e) in entries {
                let sealed = envelope::seal(Kind::MonLog, VERSION, VERSION, e);
                t.insert(*i, sealed.as_slice())?;
            }
            Ok(())
        })
    }

    /// Log entries with index in `[from, to)`, in order; a damaged entry is an error.
    pub fn read_log(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let what = "reading the log";
        let tx = self.db.begin_read().map_err(|e| self.failed(what, e))?;
        let t = tx.open_table(LOG).map_err(|e| self.failed(what, e))?;
        let mut out = Vec::new();
        for r in t.range(from..to).map_err(|e| self.failed(what, e))? {
            let (k, v) = r.map_err(|e| self.failed(what, e))?;
            let e = envelope::open::<Vec<u8>>(Kind::MonLog, VERSION, v.value()).map_err(|e| {
                self.failed("decoding a log entry", format!("entry {}: {e}", k.value()))
            })?;
            out.push((k.value(), e));
        }
        Ok(out)
    }

    /// Removes entries with index >= `from` (a new leader overwrote them).
    pub fn truncate_log(&self, from: u64) -> Result<(), StoreError> {
        self.remove_log(from, u64::MAX)
    }

    /// Removes entries with index < `upto` (they are in the saved state).
    pub fn purge_log(&self, upto: u64) -> Result<(), StoreError> {
        self.remove_log(0, upto)
    }

    fn remove_log(&self, from: u64, to: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(LOG)?;
            let keys: Vec<u64> =
                t.range(from..to)?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<_, _>>()?;
            for k in keys {
                t.remove(k)?;
            }
            Ok(())
        })
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.failed("starting a transaction", e))?;
        f(&tx).map_err(|e| self.failed("writing", e))?;
        tx.commit().map_err(|e| self.failed("committing", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    fn identity() -> Identity {
        Identity {
            fsid: [3; 16],
            name: "a".into(),
            initial_members: vec![
                ("a".into(), "127.0.0.1:3300".into()),
                ("b".into(), "127.0.0.1:3301".into()),
            ],
        }
    }

    fn quick() -> OpenOptions {
        OpenOptions {
            retries: 2,
            backoff_initial: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
        }
    }

    #[test]
    fn create_open_and_everything_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = ClusterState::new([3; 16]);
        st.apply(&Command::ConfigSet { key: "k".into(), value: "v".into() }).unwrap();
        let s = MonStore::create(dir.path(), &identity(), &st).unwrap();
        s.append_log(&[(1, b"one".to_vec()), (2, b"two".to_vec()), (3, b"three".to_vec())])
            .unwrap();
        s.save_vote(b"term 2, voted b").unwrap();
        st.apply(&Command::ConfigSet { key: "k2".into(), value: "v2".into() }).unwrap();
        s.save_state(&st).unwrap();
        drop(s);
        let s = MonStore::open(dir.path(), quick()).unwrap();
        assert_eq!(s.identity(), &identity());
        assert_eq!(s.load_state().unwrap(), st);
        assert_eq!(s.load_vote().unwrap().unwrap(), b"term 2, voted b");
        assert_eq!(s.read_log(0, 10).unwrap().len(), 3);
        s.truncate_log(3).unwrap();
        s.purge_log(2).unwrap();
        assert_eq!(s.read_log(0, 10).unwrap(), vec![(2, b"two".to_vec())]);
    }

    #[test]
    fn a_missing_store_is_not_created_and_an_existing_one_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            MonStore::open(dir.path(), quick()),
            Err(StoreError::NotInitialized { .. })
        ));
        assert!(!dir.path().join(FILE_NAME).exists(), "open created a file");
        MonStore::create(dir.path(), &identity(), &ClusterState::new([3; 16])).unwrap();
        let e = MonStore::create(dir.path(), &identity(), &ClusterState::new([4; 16])).unwrap_err();
        assert!(
            matches!(&e, StoreError::AlreadyInitialized { fsid, .. } if fsid == &"03".repeat(16)),
            "{e}"
        );
        assert_eq!(
            MonStore::open(dir.path(), quick()).unwrap().load_state().unwrap().osdmap.fsid,
            [3; 16]
        );
    }

    #[test]
    fn a_damaged_store_is_an_error_after_retries_and_is_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = ClusterState::new([3; 16]);
        for i in 0..50 {
            st.apply(&Command::ConfigSet { key: format!("key{i}"), value: "x".repeat(100) })
                .unwrap();
        }
        MonStore::create(dir.path(), &identity(), &st).unwrap();
        let path = dir.path().join(FILE_NAME);
        let good = std::fs::read(&path).unwrap();
        // Damage every 4 KiB page in turn (a byte in its middle); whatever redb makes of it,
        // opening must either fail with a clear error or return exactly the saved state.
        let mut refused = 0;
        for page in 0..good.len() / 4096 {
            let mut bad = good.clone();
            let at = page * 4096 + 2048;
            bad[at] ^= 0x5a;
            std::fs::write(&path, &bad).unwrap();
            match MonStore::open(dir.path(), quick()) {
                Ok(s) => {
                    assert_eq!(s.load_state().unwrap(), st, "page {page}: wrong state accepted")
                }
                Err(StoreError::Unreadable { attempts, .. }) => {
                    assert_eq!(attempts, 3);
                    refused += 1;
                }
                Err(e) => panic!("page {page}: unexpected error {e}"),
            }
        }
        assert!(refused > 0, "no damage was ever detected: the test damages nothing that matters");
        // Truncated to nothing: an error, and the file is still there, not reinitialized.
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(MonStore::open(dir.path(), quick()), Err(StoreError::Unreadable { .. })));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }
}
