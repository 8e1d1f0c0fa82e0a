//! The monitors' Raft: openraft 0.9 (storage v2) over the monitor store and the cluster
//! state machine, with Raft messages sent over HTTP in the versioned crc32c envelope.
//!
//! * [`LogStore`]: vote, log entries, last purged and committed ids in [`MonStore`], each
//!   write one fsynced redb transaction, so an append is on stable media before Raft is
//!   told it is.
//! * [`StateMachine`]: [`ClusterState`] plus the last applied entry and membership, saved
//!   in one transaction per applied batch (the state machine is persistent, so a restart
//!   replays nothing it already applied). A snapshot is the sealed state at some entry;
//!   installing one replaces state, position and snapshot together.
//! * [`Network`]: every message carries the cluster's fsid and the digest of its founding
//!   members; a monitor answers only messages of its own cluster.

use std::fmt;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::watch;

use crate::maps::envelope::{self, Kind};
use crate::state::{ClusterState, Command, CommandError, Response, STATE_VERSION};
use crate::store::{self, Identity, MonStore};

/// What a committed command returns to its proposer.
pub type Outcome = Result<Response, CommandError>;

/// A monitor as Raft knows it: its name and its address (API and Raft share it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonNode {
    pub name: String,
    pub addr: String,
}

impl fmt::Display for MonNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mon.{}@{}", self.name, self.addr)
    }
}

openraft::declare_raft_types!(
    /// The monitors' Raft types: commands in, outcomes out, monitors as nodes.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = MonNode,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
type SE = StorageError<NodeId>;

/// Format version of the values sealed by this module.
const VERSION: u16 = 1;

/// The Raft node id of each founding member: its position in the initial-member list.
pub fn initial_nodes(id: &Identity) -> std::collections::BTreeMap<NodeId, MonNode> {
    id.initial_members
        .iter()
        .enumerate()
        .map(|(i, (name, addr))| (i as NodeId, MonNode { name: name.clone(), addr: addr.clone() }))
        .collect()
}

/// A digest of the founding members; with the fsid it names the cluster on the wire.
pub fn cluster_tag(id: &Identity) -> u32 {
    crc32c::crc32c(&postcard::to_allocvec(&id.initial_members).expect("serializes"))
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("raft types serialize")
}

fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T, AnyError> {
    postcard::from_bytes(b).map_err(|e| AnyError::new(&e))
}

fn io(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

/// Runs blocking store I/O off the async workers when a multi-threaded runtime is there.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

// ---------------------------------------------------------------------------------------
// Log storage

#[derive(Debug, Clone)]
pub struct LogStore {
    store: Arc<MonStore>,
}

impl LogStore {
    pub fn new(store: Arc<MonStore>) -> LogStore {
        LogStore { store }
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let from = match range.start_bound() {
        Bound::Included(&x) => x,
        Bound::Excluded(&x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let to = match range.end_bound() {
        Bound::Included(&x) => x.saturating_add(1),
        Bound::Excluded(&x) => x,
        Bound::Unbounded => u64::MAX,
    };
    (from, to)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SE> {
        let (from, to) = bounds(&range);
        let raw = blocking(|| self.store.read_log(from, to))
            .map_err(|e| StorageIOError::read_logs(io(e)))?;
        let mut out = Vec::with_capacity(raw.len());
        for (i, b) in raw {
            let e: Entry<TypeConfig> =
                dec(&b).map_err(|e| StorageIOError::read_log_at_index(i, e))?;
            assert_eq!(e.log_id.index, i, "log entry stored under the wrong index");
            out.push(e);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SE> {
        let purged: Option<LogId<NodeId>> = match blocking(|| self.store.load_record(store::PURGED))
        {
            Ok(Some(b)) => dec::<Option<LogId<NodeId>>>(&b).map_err(StorageIOError::read_logs)?,
            Ok(None) => None,
            Err(e) => return Err(StorageIOError::read_logs(io(e)).into()),
        };
        let last = match blocking(|| self.store.last_log()) {
            Ok(Some((i, b))) => {
                let e: Entry<TypeConfig> =
                    dec(&b).map_err(|e| StorageIOError::read_log_at_index(i, e))?;
                Some(e.log_id)
            }
            Ok(None) => None,
            Err(e) => return Err(StorageIOError::read_logs(io(e)).into()),
        };
        Ok(LogState { last_purged_log_id: purged, last_log_id: last.or(purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SE> {
        let b = enc(vote);
        blocking(|| self.store.save_vote(&b)).map_err(|e| StorageIOError::write_vote(io(e)))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SE> {
        match blocking(|| self.store.load_vote()) {
            Ok(Some(b)) => Ok(Some(dec(&b).map_err(StorageIOError::read_vote)?)),
            Ok(None) => Ok(None),
            Err(e) => Err(StorageIOError::read_vote(io(e)).into()),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SE> {
        let b = enc(&committed);
        blocking(|| self.store.save_record(store::COMMITTED, &b))
            .map_err(|e| StorageIOError::write(io(e)))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SE> {
        match blocking(|| self.store.load_record(store::COMMITTED)) {
            Ok(Some(b)) => Ok(dec(&b).map_err(StorageIOError::read)?),
            Ok(None) => Ok(None),
            Err(e) => Err(StorageIOError::read(io(e)).into()),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SE>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let batch: Vec<(u64, Vec<u8>)> =
            entries.into_iter().map(|e| (e.log_id.index, enc(&e))).collect();
        // One fsynced transaction: durable before the callback says so.
        match blocking(|| self.store.append_log(&batch)) {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.log_io_completed(Err(std::io::Error::other(msg)));
                Err(StorageIOError::write_logs(io(e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        blocking(|| self.store.truncate_log(log_id.index))
            .map_err(|e| StorageIOError::write_logs(io(e)))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        let b = enc(&Some(log_id));
        blocking(|| self.store.purge_log_through(log_id.index, &b))
            .map_err(|e| StorageIOError::write_logs(io(e)))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// State machine

/// The replicated state and the Raft position it reflects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub cluster: ClusterState,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, MonNode>,
}

/// [`Applied`] as state format 1 wrote it (in snapshots).
#[derive(Deserialize)]
struct AppliedV1 {
    cluster: crate::state::ClusterStateV1,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, MonNode>,
}

fn decode_applied(version: u16, payload: &[u8]) -> Result<Applied, postcard::Error> {
    if version < 2 {
        let (v, _) = postcard::take_from_bytes::<AppliedV1>(payload)?;
        return Ok(Applied {
            cluster: v.cluster.into(),
            last_applied: v.last_applied,
            membership: v.membership,
        });
    }
    postcard::take_from_bytes::<Applied>(payload).map(|(v, _)| v)
}

#[derive(Serialize, Deserialize)]
struct Position {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, MonNode>,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, MonNode>,
    data: Vec<u8>,
}

/// The state machine; `shared` is what the monitor's API reads, `epoch` wakes subscribers.
#[derive(Debug, Clone)]
pub struct StateMachine {
    store: Arc<MonStore>,
    pub shared: Arc<RwLock<Applied>>,
    pub epoch: watch::Sender<u64>,
    snapshots_built: Arc<std::sync::atomic::AtomicU64>,
}

impl StateMachine {
    /// Loads the saved state and position; damage is an error, never an empty state.
    pub fn open(store: Arc<MonStore>) -> Result<StateMachine, store::StoreError> {
        let cluster = store.load_state()?;
        let pos = match store.load_record(store::APPLIED)? {
            Some(b) => {
                postcard::from_bytes::<Position>(&b).map_err(|e| store::StoreError::Failed {
                    path: store.path().to_path_buf(),
                    what: "decoding the applied position",
                    detail: e.to_string(),
                })?
            }
            None => Position { last_applied: None, membership: StoredMembership::default() },
        };
        let epoch = watch::Sender::new(cluster.osdmap.epoch);
        Ok(StateMachine {
            store,
            shared: Arc::new(RwLock::new(Applied {
                cluster,
                last_applied: pos.last_applied,
                membership: pos.membership,
            })),
            epoch,
            snapshots_built: Arc::default(),
        })
    }

    fn save(&self, a: &Applied, snapshot: Option<&[u8]>) -> Result<(), store::StoreError> {
        let pos = enc(&Position { last_applied: a.last_applied, membership: a.membership.clone() });
        blocking(|| self.store.save_applied(&a.cluster, &pos, snapshot))
    }

    fn publish(&self, a: Applied) {
        let epoch = a.cluster.osdmap.epoch;
        *self.shared.write().expect("state lock") = a;
        self.epoch.send_replace(epoch);
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SE> {
        let a = self.shared.read().expect("state lock").clone();
        let data = envelope::seal(Kind::MonSnapshot, STATE_VERSION, STATE_VERSION, &a);
        let n = self.snapshots_built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = match a.last_applied {
            Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
            None => format!("none-{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id: a.last_applied,
            last_membership: a.membership.clone(),
            snapshot_id: id,
        };
        let stored = enc(&StoredSnapshot { meta: meta.clone(), data: data.clone() });
        blocking(|| self.store.save_record(store::SNAPSHOT, &stored))
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), io(e)))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, MonNode>), SE> {
        let a = self.shared.read().expect("state lock");
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, SE>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut next = self.shared.read().expect("state lock").clone();
        let mut out = Vec::new();
        for e in entries {
            if let Some(prev) = next.last_applied {
                assert!(e.log_id.index > prev.index, "applying {} after {}", e.log_id, prev);
            }
            next.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => {
                    out.push(Ok(Response::Done { epoch: next.cluster.osdmap.epoch }))
                }
                EntryPayload::Normal(cmd) => out.push(next.cluster.apply(&cmd)),
                EntryPayload::Membership(m) => {
                    next.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Ok(Response::Done { epoch: next.cluster.osdmap.epoch }));
                }
            }
        }
        // Durable before anyone sees it.
        self.save(&next, None).map_err(|e| StorageIOError::write_state_machine(io(e)))?;
        self.publish(next);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SE> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MonNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SE> {
        let data = snapshot.into_inner();
        let bad = |e: AnyError| StorageIOError::read_snapshot(Some(meta.signature()), e);
        let a: Applied =
            envelope::open_versioned(Kind::MonSnapshot, STATE_VERSION, &data, decode_applied)
                .map_err(|e| bad(io(e)))?;
        if a.last_applied != meta.last_log_id || a.membership != meta.last_membership {
            return Err(bad(AnyError::error("snapshot contents disagree with its metadata")).into());
        }
        let stored = enc(&StoredSnapshot { meta: meta.clone(), data: data.clone() });
        self.save(&a, Some(&stored))
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), io(e)))?;
        self.publish(a);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SE> {
        match blocking(|| self.store.load_record(store::SNAPSHOT)) {
            Ok(Some(b)) => {
                let s: StoredSnapshot =
                    dec(&b).map_err(|e| StorageIOError::read_snapshot(None, e))?;
                Ok(Some(Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(StorageIOError::read_snapshot(None, io(e)).into()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Network

/// A Raft message or reply on the wire (sealed as [`Kind::RaftRpc`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct Wire<T> {
    pub fsid: [u8; 16],
    pub tag: u32,
    pub from: NodeId,
    pub body: T,
}

/// Who this monitor is on the wire.
#[derive(Debug, Clone)]
pub struct WireId {
    pub fsid: [u8; 16],
    pub tag: u32,
    pub me: NodeId,
}

impl WireId {
    pub fn seal<T: Serialize>(&self, body: T) -> Vec<u8> {
        let w = Wire { fsid: self.fsid, tag: self.tag, from: self.me, body };
        envelope::seal(Kind::RaftRpc, VERSION, VERSION, &w)
    }

    /// Opens a message and checks that it is from this cluster.
    pub fn open<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<(NodeId, T), String> {
        let w: Wire<T> = envelope::open(Kind::RaftRpc, VERSION, bytes)
            .map_err(|e| format!("bad message: {e}"))?;
        if w.fsid != self.fsid {
            return Err(format!(
                "message from another cluster (fsid {} is not ours, {})",
                crate::conf::format_fsid(&w.fsid),
                crate::conf::format_fsid(&self.fsid)
            ));
        }
        if w.tag != self.tag {
            return Err(format!(
                "message from a monitor with other founding members (tag {:08x}, ours {:08x})",
                w.tag, self.tag
            ));
        }
        Ok((w.from, w.body))
    }
}

#[derive(Debug, Clone)]
pub struct Network {
    pub id: WireId,
    pub http: reqwest::Client,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &MonNode) -> Peer {
        Peer { id: self.id.clone(), http: self.http.clone(), target, addr: node.addr.clone() }
    }
}

#[derive(Debug)]
pub struct Peer {
    id: WireId,
    http: reqwest::Client,
    target: NodeId,
    addr: String,
}

impl Peer {
    async fn call<Req: Serialize, Resp: DeserializeOwned, E>(
        &self,
        what: &str,
        req: Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, MonNode, E>>
    where
        E: std::error::Error + DeserializeOwned,
    {
        let url = format!("http://{}/raft/{what}", self.addr);
        let r =
            self.http.post(&url).timeout(timeout).body(self.id.seal(req)).send().await.map_err(
                |e| {
                    if e.is_connect() {
                        RPCError::Unreachable(Unreachable::new(&e))
                    } else {
                        RPCError::Network(NetworkError::new(&e))
                    }
                },
            )?;
        let status = r.status();
        let body = r.bytes().await.map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if !status.is_success() {
            let msg = String::from_utf8_lossy(&body).into_owned();
            return Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other(format!(
                "{url}: {status}: {msg}"
            )))));
        }
        let (_, reply): (NodeId, Result<Resp, E>) = self
            .id
            .open(&body)
            .map_err(|m| RPCError::Network(NetworkError::new(&std::io::Error::other(m))))?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MonNode, RaftError<NodeId>>> {
        self.call("append", rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, MonNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MonNode, RaftError<NodeId>>> {
        self.call("vote", rpc, option.hard_ttl()).await
    }
}

/// Raft timing for monitors on ordinary (and shared, loaded) machines.
pub fn config() -> openraft::Config {
    openraft::Config {
        cluster_name: "sluice-mon".into(),
        heartbeat_interval: 250,
        election_timeout_min: 1500,
        election_timeout_max: 3000,
        install_snapshot_timeout: 5000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 500,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), SE> {
            let dir = tempfile::tempdir().unwrap();
            let identity = Identity {
                fsid: [7; 16],
                name: "a".into(),
                initial_members: vec![("a".into(), "127.0.0.1:1".into())],
            };
            let store = Arc::new(
                MonStore::create(dir.path(), &identity, &ClusterState::new([7; 16])).unwrap(),
            );
            let sm = StateMachine::open(Arc::clone(&store)).unwrap();
            Ok((dir, LogStore::new(store), sm))
        }
    }

    /// openraft's own storage conformance suite, against the redb-backed store.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }

    #[test]
    fn messages_of_another_cluster_are_refused() {
        let a = WireId { fsid: [1; 16], tag: 5, me: 0 };
        let b = WireId { fsid: [2; 16], tag: 5, me: 1 };
        let c = WireId { fsid: [1; 16], tag: 6, me: 2 };
        let m = a.seal(42u32);
        assert_eq!(a.open::<u32>(&m).unwrap(), (0, 42));
        assert!(b.open::<u32>(&m).unwrap_err().contains("another cluster"));
        assert!(c.open::<u32>(&m).unwrap_err().contains("founding members"));
        assert!(a.open::<u32>(b"garbage").unwrap_err().contains("bad message"));
    }

    #[test]
    fn applied_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity {
            fsid: [7; 16],
            name: "a".into(),
            initial_members: vec![("a".into(), "127.0.0.1:1".into())],
        };
        let store =
            Arc::new(MonStore::create(dir.path(), &identity, &ClusterState::new([7; 16])).unwrap());
        let mut sm = StateMachine::open(Arc::clone(&store)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let cmd = Command::CreatePool { name: "p".into(), size: 3, min_size: 2, pg_num: 8 };
        let ent = Entry::<TypeConfig> {
            log_id: openraft::testing::log_id(1, 0, 1),
            payload: EntryPayload::Normal(cmd),
        };
        let out = rt.block_on(sm.apply(vec![ent])).unwrap();
        let epoch = ClusterState::new([7; 16]).osdmap.epoch + 1;
        assert_eq!(out, vec![Ok(Response::Done { epoch })]);
        drop(sm);
        drop(store);
        let store = Arc::new(MonStore::open(dir.path(), Default::default()).unwrap());
        let mut sm = StateMachine::open(store).unwrap();
        let (applied, _) = rt.block_on(sm.applied_state()).unwrap();
        assert_eq!(applied.unwrap().index, 1);
        assert!(sm.shared.read().unwrap().cluster.osdmap.pool_by_name("p").is_some());
    }
}
