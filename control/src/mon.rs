//! `sluice-mon run`: one monitor. Raft (openraft) replicates [`ClusterState`]; every
//! monitor serves the management API from its applied state and forwards writes to the
//! leader; the leader also runs the OSD failure detector.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ServerState, raft::AppendEntriesRequest};
use serde::Deserialize;

use sluice_auth::kdc;

use crate::api::{self, ApiError, ErrorKind, HealthStatus};
use crate::auth;
use crate::conf::format_fsid;
use crate::maps::Maintenance;
use crate::maps::envelope::{self, Kind};
use crate::raft::{
    self, LogStore, MonNode, Network, NodeId, Raft, StateMachine, TypeConfig, WireId,
};
use crate::state::{Catchup, ClusterState, Command, CommandError, FailureDetector, Response};
use crate::store::MonStore;

/// How long a write may wait for a quorum before the caller is told there is none.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer monitor that has not answered for this long counts as down.
const PEER_DOWN_AFTER: Duration = Duration::from_secs(4);

#[derive(Debug, Default)]
struct Counters {
    commands: AtomicU64,
    command_errors: AtomicU64,
    forwarded: AtomicU64,
    rejected_fsid: AtomicU64,
    refused_raft: AtomicU64,
    auth_logins: AtomicU64,
    auth_failures: AtomicU64,
}

pub struct Monitor {
    pub raft: Raft,
    pub sm: StateMachine,
    pub me: NodeId,
    pub name: String,
    pub fsid: [u8; 16],
    /// The founding members (the monitor map until Raft has applied its membership).
    members: BTreeMap<NodeId, MonNode>,
    wire: WireId,
    http: reqwest::Client,
    started: Instant,
    /// Last successful probe of each peer monitor.
    peer_seen: Mutex<BTreeMap<NodeId, Instant>>,
    /// Present while this monitor is the leader.
    detector: Mutex<Option<FailureDetector>>,
    counters: Counters,
    /// Signed requests seen within their window (refused a second time).
    replays: Mutex<sluice_auth::request::ReplayCache>,
    /// The OSDs' latest PG reports (every OSD reports to every monitor).
    pg_stats: Mutex<crate::pgstats::PgStats>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("name", &self.name).field("me", &self.me).finish()
    }
}

/// An API error with its HTTP status.
#[derive(Debug)]
pub struct Failure(StatusCode, ApiError);

impl Failure {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        let status = match kind {
            ErrorKind::NoQuorum => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::WrongFsid => StatusCode::CONFLICT,
            ErrorKind::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        };
        Failure(status, ApiError { kind, message: message.into() })
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> HttpResponse {
        (self.0, axum::Json(self.1)).into_response()
    }
}

fn now_ns(started: Instant) -> u64 {
    started.elapsed().as_nanos() as u64
}

impl Monitor {
    /// Opens the Raft node over `store`. A founding member whose log is empty proposes
    /// the founding membership (every founding member proposes the same one; Raft keeps
    /// one); a monitor outside the founding set never does, so it never forms a quorum
    /// on its own.
    pub async fn start(store: Arc<MonStore>) -> anyhow::Result<Arc<Monitor>> {
        let identity = store.identity().clone();
        let members = raft::initial_nodes(&identity);
        let me = *members
            .iter()
            .find(|(_, n)| n.name == identity.name)
            .map(|(id, _)| id)
            .ok_or_else(|| anyhow::anyhow!("{} is not a founding member", identity.name))?;
        let wire = WireId { fsid: identity.fsid, tag: raft::cluster_tag(&identity), me };
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(1)).build()?;
        let sm = StateMachine::open(Arc::clone(&store))?;
        let net = Network { id: wire.clone(), http: http.clone() };
        let config = Arc::new(raft::config().validate()?);
        let raft =
            openraft::Raft::new(me, config, net, LogStore::new(Arc::clone(&store)), sm.clone())
                .await?;
        let fresh = {
            let m = raft.metrics();
            let m = m.borrow();
            m.last_log_index.is_none() && m.vote.leader_id().term == 0
        };
        if fresh {
            match raft.initialize(members.clone()).await {
                Ok(()) => tracing::info!("proposed the founding membership"),
                Err(e) => tracing::info!("not initializing: {e}"),
            }
        }
        Ok(Arc::new(Monitor {
            raft,
            sm,
            me,
            name: identity.name.clone(),
            fsid: identity.fsid,
            members,
            wire,
            http,
            started: Instant::now(),
            peer_seen: Mutex::new(BTreeMap::new()),
            detector: Mutex::new(None),
            counters: Counters::default(),
            replays: Mutex::new(Default::default()),
            pg_stats: Mutex::new(Default::default()),
        }))
    }

    fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.current_leader == Some(self.me) && m.state == ServerState::Leader
    }

    /// The monitor map: the replicated Raft membership (the founding members until the
    /// first membership entry is applied).
    fn nodes(&self) -> BTreeMap<NodeId, MonNode> {
        let a = self.sm.shared.read().expect("state lock");
        let nodes: BTreeMap<NodeId, MonNode> =
            a.membership.membership().nodes().map(|(id, n)| (*id, n.clone())).collect();
        if nodes.is_empty() { self.members.clone() } else { nodes }
    }

    fn no_quorum_message(&self, mon: &api::MonStatus) -> String {
        let names = |reachable_only: bool| {
            mon.members
                .iter()
                .filter(|m| m.reachable || !reachable_only)
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "mon.{} has no quorum: no leader among {} (reachable from here: {}); a majority of {} must be up",
            self.name,
            names(false),
            names(true),
            mon.members.len() / 2 + 1
        )
    }

    /// Proposes `cmd`; on a follower, forwards it to the leader.
    pub async fn submit(&self, cmd: Command, forwarded: bool) -> Result<Response, Failure> {
        self.counters.commands.fetch_add(1, Ordering::Relaxed);
        if !self.is_leader() {
            return match self.leader() {
                Some(_)
                    if self
                        .sm
                        .shared
                        .read()
                        .expect("state lock")
                        .cluster
                        .auth
                        .mon_key()
                        .is_some() =>
                {
                    // Commands from callers are forwarded with their signatures by the
                    // handlers; this one lost its leader on the way.
                    Err(Failure::new(ErrorKind::NoQuorum, "leadership changed; retry"))
                }
                Some(l) if !forwarded && l != self.me => {
                    let body = serde_json::to_vec(&cmd).expect("commands serialize");
                    let bytes = self.forward(l, "/v1/command", body).await?;
                    serde_json::from_slice::<Response>(&bytes).map_err(|e| {
                        Failure::new(ErrorKind::Internal, format!("leader's reply: {e}"))
                    })
                }
                Some(_) if forwarded => Err(Failure::new(
                    ErrorKind::NoQuorum,
                    "leadership changed while the command was forwarded; retry",
                )),
                _ => Err(Failure::new(
                    ErrorKind::NoQuorum,
                    self.no_quorum_message(&self.mon_status()),
                )),
            };
        }
        let r = tokio::time::timeout(COMMIT_TIMEOUT, self.raft.client_write(cmd)).await;
        match r {
            Ok(Ok(w)) => w.data.map_err(|e: CommandError| {
                self.counters.command_errors.fetch_add(1, Ordering::Relaxed);
                Failure::new(ErrorKind::Rejected, e.to_string())
            }),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Err(Failure::new(ErrorKind::NoQuorum, "leadership changed during the write; retry"))
            }
            Ok(Err(e)) => Err(Failure::new(ErrorKind::NoQuorum, format!("not committed: {e}"))),
            Err(_) => Err(Failure::new(
                ErrorKind::NoQuorum,
                format!(
                    "not committed within {COMMIT_TIMEOUT:?} (outcome unknown): {}",
                    self.no_quorum_message(&self.mon_status())
                ),
            )),
        }
    }

    /// Sends a JSON request on to the leader and returns its successful reply body.
    async fn forward(&self, leader: NodeId, path: &str, body: Vec<u8>) -> Result<Bytes, Failure> {
        self.forward_with(leader, path, body, None).await
    }

    /// On a follower: sends a signed change on to the leader with the caller's signature
    /// and, once the leader answered, waits (up to the commit timeout) until this replica
    /// shows it (`applied`): read your writes, since the caller's next request may come
    /// here. No leader, or a request forwarded to us already: no quorum.
    async fn forward_signed_then_wait(
        &self,
        h: &HeaderMap,
        path: &str,
        body: &Bytes,
        applied: impl Fn(&ClusterState) -> bool,
    ) -> Result<Bytes, Failure> {
        let leader = self.leader().filter(|l| !forwarded(h) && *l != self.me);
        let Some(l) = leader else {
            return Err(Failure::new(
                ErrorKind::NoQuorum,
                self.no_quorum_message(&self.mon_status()),
            ));
        };
        let sig = h.get(sluice_auth::request::HEADER);
        let bytes = self.forward_with(l, path, body.to_vec(), sig).await?;
        let until = Instant::now() + COMMIT_TIMEOUT;
        while !applied(&self.sm.shared.read().expect("state lock").cluster)
            && Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(bytes)
    }

    /// [`Self::forward`] carrying the caller's request signature (the leader checks it).
    async fn forward_with(
        &self,
        leader: NodeId,
        path: &str,
        body: Vec<u8>,
        signature: Option<&HeaderValue>,
    ) -> Result<Bytes, Failure> {
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        let nodes = self.nodes();
        let Some(node) = nodes.get(&leader) else {
            return Err(Failure::new(ErrorKind::NoQuorum, "the leader is not a known member"));
        };
        let mut req = self.http.post(format!("http://{}{path}", node.addr));
        if let Some(sig) = signature {
            req = req.header(sluice_auth::request::HEADER, sig);
        }
        let r = req
            .header(api::FSID_HEADER, format_fsid(&self.fsid))
            .header(api::FORWARDED_HEADER, "1")
            .header(header::CONTENT_TYPE, "application/json")
            .timeout(COMMIT_TIMEOUT + Duration::from_secs(2))
            .body(body)
            .send()
            .await
            .map_err(|e| {
                Failure::new(ErrorKind::NoQuorum, format!("forwarding to leader {node}: {e}"))
            })?;
        let status = r.status();
        let bytes = r.bytes().await.map_err(|e| {
            Failure::new(ErrorKind::NoQuorum, format!("forwarding to leader {node}: {e}"))
        })?;
        if status.is_success() {
            return Ok(bytes);
        }
        match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => Err(Failure(status, e)),
            Err(_) => Err(Failure::new(
                ErrorKind::Internal,
                format!("leader {node}: {status}: {}", String::from_utf8_lossy(&bytes)),
            )),
        }
    }

    pub fn mon_status(&self) -> api::MonStatus {
        let nodes = self.nodes();
        let (leader, term, last_applied) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.current_leader, m.current_term, m.last_applied.map_or(0, |l| l.index))
        };
        let seen = self.peer_seen.lock().expect("lock");
        api::MonStatus {
            name: self.name.clone(),
            members: nodes
                .iter()
                .map(|(id, n)| api::MonMember {
                    name: n.name.clone(),
                    addr: n.addr.clone(),
                    reachable: *id == self.me
                        || seen.get(id).is_some_and(|t| t.elapsed() < PEER_DOWN_AFTER),
                })
                .collect(),
            leader: leader
                .map(|l| nodes.get(&l).map_or_else(|| format!("node {l}"), |n| n.name.clone())),
            term,
            last_applied,
        }
    }

    pub fn health(&self) -> api::Health {
        self.health_of(&self.mon_status())
    }

    fn health_of(&self, mon: &api::MonStatus) -> api::Health {
        use api::Check;
        let mut checks = Vec::new();
        if mon.leader.is_none() {
            checks.push(Check {
                name: "MON_NO_QUORUM".into(),
                severity: HealthStatus::Err,
                summary: "the monitors have no quorum: no map changes can be made".into(),
                detail: vec![self.no_quorum_message(mon)],
            });
        }
        let reachable = mon.members.iter().filter(|m| m.reachable).count();
        if mon.leader.is_some()
            && reachable <= mon.members.len() / 2
            && self.started.elapsed() > PEER_DOWN_AFTER
        {
            checks.push(Check {
                name: "MON_NO_QUORUM".into(),
                severity: HealthStatus::Err,
                summary: format!(
                    "only {reachable} of {} monitors reachable: map changes cannot commit",
                    mon.members.len()
                ),
                detail: vec![self.no_quorum_message(mon)],
            });
        }
        let down: Vec<&api::MonMember> = mon.members.iter().filter(|m| !m.reachable).collect();
        if !down.is_empty() && self.started.elapsed() > PEER_DOWN_AFTER {
            checks.push(Check {
                name: "MON_DOWN".into(),
                severity: HealthStatus::Warn,
                summary: format!("{}/{} mons down", down.len(), mon.members.len()),
                detail: down
                    .iter()
                    .map(|m| {
                        format!("mon.{} ({}) does not answer mon.{}", m.name, m.addr, self.name)
                    })
                    .collect(),
            });
        }
        let st = self.sm.shared.read().expect("state lock");
        let map = &st.cluster.osdmap;
        let down: Vec<String> = map
            .osds
            .values()
            .filter(|o| !o.up && o.is_in)
            .map(|o| format!("{} ({}/{}) is down", o.id, o.location.rack, o.location.host))
            .collect();
        if !down.is_empty() {
            checks.push(Check {
                name: "OSD_DOWN".into(),
                severity: HealthStatus::Warn,
                summary: format!("{} osds down", down.len()),
                detail: down,
            });
        }
        let flags = api::flag_names(map);
        if !flags.is_empty() {
            checks.push(Check {
                name: "OSDMAP_FLAGS".into(),
                severity: HealthStatus::Warn,
                summary: format!("{} flag(s) set", flags.join(",")),
                detail: vec![],
            });
        }
        let maint: Vec<String> = map
            .osds
            .values()
            .filter(|o| o.maintenance != Maintenance::None)
            .map(|o| format!("{} is {:?}", o.id, o.maintenance).to_lowercase())
            .collect();
        if !maint.is_empty() {
            checks.push(Check {
                name: "OSD_MAINTENANCE".into(),
                severity: HealthStatus::Warn,
                summary: format!("{} osds in maintenance", maint.len()),
                detail: maint,
            });
        }
        let usable = map.osds.values().filter(|o| o.up && o.is_in).count();
        let short: Vec<String> = map
            .pools
            .values()
            .filter(|p| usize::from(p.size) > usable)
            .map(|p| {
                format!("pool {:?} wants {} copies, {usable} osds are up and in", p.name, p.size)
            })
            .collect();
        if !short.is_empty() {
            let none = usable == 0;
            checks.push(Check {
                name: if none { "OSD_ALL_DOWN" } else { "POOL_TOO_FEW_OSDS" }.into(),
                severity: if none { HealthStatus::Err } else { HealthStatus::Warn },
                summary: format!("{} pools cannot place all their copies", short.len()),
                detail: short,
            });
        }
        let now = Instant::now();
        let stats = self.pg_stats.lock().expect("pg stats lock");
        checks.extend(stats.checks(&stats.table(map, now), now));
        api::Health::from_checks(checks)
    }

    /// Every PG's state (see `pgstats`).
    pub fn pg_table(&self) -> api::PgTable {
        let st = self.sm.shared.read().expect("state lock");
        self.pg_stats.lock().expect("pg stats lock").table(&st.cluster.osdmap, Instant::now())
    }

    pub fn status(&self) -> api::Status {
        let mon = self.mon_status();
        let health = self.health_of(&mon);
        let st = self.sm.shared.read().expect("state lock");
        let m = &st.cluster.osdmap;
        api::Status {
            fsid: format_fsid(&self.fsid),
            health,
            mon,
            osdmap: api::OsdSummary {
                epoch: m.epoch,
                osds: m.osds.len(),
                up: m.osds.values().filter(|o| o.up).count(),
                is_in: m.osds.values().filter(|o| o.is_in).count(),
                flags: api::flag_names(m),
            },
            pools: m.pools.len(),
        }
    }

    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let mut g = |name: &str, help: &str, v: f64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let mon = self.mon_status();
        let health = self.health_of(&mon);
        g(
            "sluice_mon_is_leader",
            "1 if this monitor is the Raft leader",
            f64::from(u8::from(self.is_leader())),
        );
        g(
            "sluice_mon_has_quorum",
            "1 if this monitor knows a leader",
            f64::from(u8::from(mon.leader.is_some())),
        );
        g("sluice_mon_term", "current Raft term", mon.term as f64);
        g("sluice_mon_last_applied_index", "last Raft entry applied here", mon.last_applied as f64);
        g("sluice_mon_members", "monitors in the monitor map", mon.members.len() as f64);
        g(
            "sluice_mon_members_reachable",
            "monitors answering this one (itself included)",
            mon.members.iter().filter(|m| m.reachable).count() as f64,
        );
        g(
            "sluice_health_status",
            "0 HEALTH_OK, 1 HEALTH_WARN, 2 HEALTH_ERR",
            f64::from(health.status as u8),
        );
        {
            let st = self.sm.shared.read().expect("state lock");
            let map = &st.cluster.osdmap;
            g("sluice_osdmap_epoch", "OSD map epoch", map.epoch as f64);
            g("sluice_osds", "OSDs in the map", map.osds.len() as f64);
            g("sluice_osds_up", "OSDs up", map.osds.values().filter(|o| o.up).count() as f64);
            g("sluice_osds_in", "OSDs in", map.osds.values().filter(|o| o.is_in).count() as f64);
            g("sluice_pools", "pools", map.pools.len() as f64);
        }
        {
            let st = self.sm.shared.read().expect("state lock");
            let _ = writeln!(
                s,
                "# HELP sluice_auth_secret_id Current rotating secret of each service\n\
                 # TYPE sluice_auth_secret_id gauge"
            );
            for (svc, r) in &st.cluster.auth.rotating {
                let _ =
                    writeln!(s, "sluice_auth_secret_id{{service=\"{svc}\"}} {}", r.current().id);
            }
        }
        let _ = writeln!(
            s,
            "# HELP sluice_health_check A raised health check (1)\n# TYPE sluice_health_check gauge"
        );
        for c in &health.checks {
            let _ = writeln!(
                s,
                "sluice_health_check{{check=\"{}\",severity=\"{}\"}} 1",
                c.name,
                c.severity.as_str()
            );
        }
        let mut c = |name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        c("sluice_mon_commands_total", "commands submitted here", &self.counters.commands);
        c(
            "sluice_mon_command_errors_total",
            "commands the cluster refused",
            &self.counters.command_errors,
        );
        c(
            "sluice_mon_forwarded_total",
            "requests forwarded to the leader",
            &self.counters.forwarded,
        );
        c(
            "sluice_mon_wrong_fsid_total",
            "requests refused for carrying another cluster's fsid",
            &self.counters.rejected_fsid,
        );
        c(
            "sluice_mon_raft_refused_total",
            "Raft messages refused: undecodable, or of another cluster or founding set",
            &self.counters.refused_raft,
        );
        c(
            "sluice_mon_auth_logins_total",
            "logins that got a session key",
            &self.counters.auth_logins,
        );
        c(
            "sluice_mon_auth_failures_total",
            "logins refused (wrong key, unknown entity, stale challenge)",
            &self.counters.auth_failures,
        );
        s
    }

    /// Background work: probing peers, and on the leader secret rotation and the failure
    /// detector.
    pub fn spawn_background(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000));
            loop {
                tick.tick().await;
                for (id, n) in me.nodes() {
                    if id == me.me {
                        continue;
                    }
                    let ok = me
                        .http
                        .get(format!("http://{}/v1/ping", n.addr))
                        .header(api::FSID_HEADER, format_fsid(&me.fsid))
                        .timeout(Duration::from_millis(900))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        me.peer_seen.lock().expect("lock").insert(id, Instant::now());
                    }
                }
            }
        });
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000));
            loop {
                tick.tick().await;
                for cmd in me.rotations_due() {
                    if let Command::AuthRotate { service, next } = &cmd {
                        tracing::info!("rotating the {service} secret (next id {})", next.id);
                    }
                    if let Err(e) = me.submit(cmd, true).await {
                        tracing::warn!("rotating a service secret: {}", e.1.message);
                    }
                }
            }
        });
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let cmds = me.detector_tick();
                for cmd in cmds {
                    tracing::info!("failure detector: {cmd:?}");
                    if let Err(e) = me.submit(cmd, true).await {
                        tracing::warn!("failure detector: {}", e.1.message);
                    }
                }
            }
        });
    }

    /// On the leader: the service secrets whose lifetime is over, as commands carrying
    /// their successors.
    fn rotations_due(&self) -> Vec<Command> {
        if !self.is_leader() {
            return Vec::new();
        }
        let st = self.sm.shared.read().expect("state lock");
        let ttl = auth::policy(&st.cluster.config).ticket_ttl_ms;
        st.cluster
            .auth
            .rotations_due(auth::wall_ms(), ttl)
            .into_iter()
            .map(|(service, next)| Command::AuthRotate { service, next })
            .collect()
    }

    fn detector_tick(&self) -> Vec<Command> {
        let mut d = self.detector.lock().expect("lock");
        if !self.is_leader() {
            *d = None;
            return Vec::new();
        }
        let now = now_ns(self.started);
        let st = self.sm.shared.read().expect("state lock");
        let cfg = &st.cluster.config;
        let ns = |key: &str, default: f64| (api::config_secs(cfg, key, default) * 1e9) as u64;
        let det = d.get_or_insert_with(|| {
            tracing::info!("leader: starting the failure detector");
            FailureDetector::new(now, 0, 1, 0, 0)
        });
        det.grace_ns = ns("osd_heartbeat_grace", 20.0);
        det.min_reporters = cfg
            .get("mon_osd_min_down_reporters")
            .and_then(|v| v.parse().ok())
            .unwrap_or(2usize)
            .max(1);
        det.beacon_grace_ns = ns("mon_osd_beacon_grace", 30.0);
        det.down_out_interval_ns = ns("mon_osd_down_out_interval", 600.0);
        det.tick(&st.cluster.osdmap, now)
    }

    fn with_detector(&self, f: impl FnOnce(&mut FailureDetector, u64)) {
        if let Some(d) = self.detector.lock().expect("lock").as_mut() {
            f(d, now_ns(self.started));
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP

type St = State<Arc<Monitor>>;

async fn check_fsid(State(m): St, req: Request, next: Next) -> HttpResponse {
    if let Some(v) = req.headers().get(api::FSID_HEADER) {
        let ours = format_fsid(&m.fsid);
        if v.to_str().ok().map(|s| s.trim().to_ascii_lowercase()).as_deref() != Some(ours.as_str())
        {
            m.counters.rejected_fsid.fetch_add(1, Ordering::Relaxed);
            return Failure::new(
                ErrorKind::WrongFsid,
                format!(
                    "mon.{} belongs to cluster {ours}, not {}",
                    m.name,
                    v.to_str().unwrap_or("(unreadable)")
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// What an endpoint needs of its caller's mon caps (with authentication on).
enum Need {
    /// Open, or checked by the handler itself.
    Nothing,
    Caps(sluice_auth::Perms),
    /// `POST /v1/command`: `w`, except an OSD marking only itself down (`x`, what daemons
    /// do when they stop).
    Command,
}

fn need_of(path: &str) -> Need {
    use sluice_auth::Perms;
    match path {
        "/v1/status" | "/v1/mon" | "/v1/osdmap" | "/v1/osd/map" | "/v1/config"
        | "/v1/subscribe" | "/v1/pg/stats" => Need::Caps(Perms::R),
        "/v1/pg/scrub" => Need::Caps(Perms::W),
        "/v1/command" => Need::Command,
        "/v1/osd/boot" | "/v1/osd/beacon" | "/v1/osd/failure" | "/v1/osd/pgstats" => {
            Need::Caps(Perms::X)
        }
        // Liveness, health and metrics are open; the auth endpoints and OSD registration
        // check their own signatures; Raft is between monitors (see ARCHITECTURE).
        _ => Need::Nothing,
    }
}

/// With authentication on (the cluster was made with a keyring), the management API
/// serves only requests signed by an entity whose caps allow them (`need_of`); 401
/// names what is missing, 403 the cap. Forwarded requests carry the caller's signature
/// and are checked again by the leader.
async fn check_auth(State(m): St, req: Request, next: Next) -> HttpResponse {
    let need = need_of(req.uri().path());
    if matches!(need, Need::Nothing)
        || m.sm.shared.read().expect("state lock").cluster.auth.mon_key().is_none()
    {
        return next.run(req).await;
    }
    if !req.headers().contains_key(sluice_auth::request::HEADER) {
        // Said before reading any body.
        return unsigned(req.method().as_str(), req.uri().path()).into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_API_BODY).await {
        Ok(b) => b,
        Err(e) => return Failure::new(ErrorKind::BadRequest, format!("body: {e}")).into_response(),
    };
    let target = parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str()).to_string();
    let checked = signed_by(&m, &parts.headers, parts.method.as_str(), &target, &bytes).and_then(
        |(ticket, _)| {
            let perms = match need {
                Need::Caps(p) => p,
                Need::Command => match serde_json::from_slice::<Command>(&bytes) {
                    Ok(Command::MarkDown { ids, .. })
                        if ids.len() == 1 && ticket.entity.osd_id() == Some(ids[0].0) =>
                    {
                        sluice_auth::Perms::X
                    }
                    _ => sluice_auth::Perms::W,
                },
                Need::Nothing => unreachable!("returned above"),
            };
            ticket.caps.check(perms, None).map_err(|e| denied(&ticket, e))?;
            osd_endpoint_caller(&m, parts.uri.path(), &ticket, &bytes)
        },
    );
    if let Err(f) = checked {
        return f.into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// The largest request body the management API reads (axum's default for handlers).
const MAX_API_BODY: usize = 2 << 20;

/// The OSD endpoints speak for one OSD: an `osd.N` caller only for itself (its uuid at
/// boot, its id in beacons and as the reporter of failures), and a boot needs an OSD
/// registered through `/v1/osd/new`. Anyone else needs mon cap `*`.
fn osd_endpoint_caller(
    m: &Monitor,
    path: &str,
    ticket: &sluice_auth::AuthTicket,
    body: &[u8],
) -> Result<(), Failure> {
    let deny = |why: String| denied(ticket, why);
    let claimed = match path {
        "/v1/osd/boot" => {
            let r: api::BootRequest = parse(body)?;
            let st = m.sm.shared.read().expect("state lock");
            match st.cluster.osdmap.osds.values().find(|o| o.uuid == r.uuid) {
                Some(o) => o.id,
                None => {
                    return Err(deny(
                        "this OSD is not registered: its first run registers it (POST /v1/osd/new)"
                            .into(),
                    ));
                }
            }
        }
        "/v1/osd/beacon" => parse::<api::Beacon>(body)?.id,
        "/v1/osd/pgstats" => parse::<api::PgStatsReport>(body)?.id,
        "/v1/osd/failure" => parse::<api::FailureReport>(body)?.reporter,
        _ => return Ok(()),
    };
    if ticket.entity.osd_id() == Some(claimed.0)
        || ticket.caps.allows(sluice_auth::Perms::ALL, None)
    {
        return Ok(());
    }
    Err(deny(format!("may speak only for itself, not for {claimed}")))
}

pub fn router(m: Arc<Monitor>) -> Router {
    Router::new()
        .route("/raft/append", post(raft_append))
        .route("/raft/vote", post(raft_vote))
        .route("/raft/snapshot", post(raft_snapshot))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/ping", get(ping))
        .route("/v1/status", get(status))
        .route("/v1/mon", get(mon_stat))
        .route("/v1/osdmap", get(osdmap))
        .route("/v1/osd/map", get(osd_map))
        .route("/v1/config", get(config))
        .route("/v1/command", post(command))
        .route("/v1/subscribe", get(subscribe))
        .route("/v1/osd/boot", post(osd_boot))
        .route("/v1/osd/new", post(osd_new))
        .route("/v1/osd/beacon", post(osd_beacon))
        .route("/v1/osd/pgstats", post(osd_pgstats))
        .route("/v1/pg/stats", get(pg_stats))
        .route("/v1/pg/scrub", post(pg_scrub))
        .route("/v1/osd/failure", post(osd_failure))
        .route("/v1/auth/challenge", get(auth_challenge))
        .route("/v1/auth/session", post(auth_session))
        .route("/v1/auth/rotating", post(auth_rotating))
        .route("/v1/auth/command", post(auth_command))
        .layer(middleware::from_fn_with_state(Arc::clone(&m), check_auth))
        .layer(middleware::from_fn_with_state(Arc::clone(&m), check_fsid))
        .with_state(m)
}

fn binary(bytes: Vec<u8>) -> HttpResponse {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], bytes)
        .into_response()
}

/// Opens a Raft message of our cluster, hands it to Raft, seals the reply. A message
/// that is undecodable or of another cluster (fsid, founding members) is answered 403.
async fn raft_rpc<Req, Fut, Resp>(
    m: &Monitor,
    body: &[u8],
    call: impl FnOnce(Req) -> Fut,
) -> HttpResponse
where
    Req: serde::de::DeserializeOwned,
    Fut: std::future::Future<Output = Resp>,
    Resp: serde::Serialize,
{
    match m.wire.open::<Req>(body) {
        Ok((_, req)) => binary(m.wire.seal(call(req).await)),
        Err(why) => {
            m.counters.refused_raft.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("refused a Raft message: {why}");
            (StatusCode::FORBIDDEN, why).into_response()
        }
    }
}

async fn raft_append(State(m): St, body: Bytes) -> HttpResponse {
    raft_rpc(&m, &body, |r: AppendEntriesRequest<TypeConfig>| m.raft.append_entries(r)).await
}

async fn raft_vote(State(m): St, body: Bytes) -> HttpResponse {
    raft_rpc(&m, &body, |r| m.raft.vote(r)).await
}

async fn raft_snapshot(State(m): St, body: Bytes) -> HttpResponse {
    raft_rpc(&m, &body, |r| m.raft.install_snapshot(r)).await
}

async fn ping(State(m): St) -> axum::Json<api::Ping> {
    axum::Json(api::Ping { name: m.name.clone(), fsid: format_fsid(&m.fsid) })
}

async fn health(State(m): St) -> axum::Json<api::Health> {
    axum::Json(m.health())
}

async fn metrics(State(m): St) -> HttpResponse {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))],
        m.metrics_text(),
    )
        .into_response()
}

async fn status(State(m): St) -> axum::Json<api::Status> {
    axum::Json(m.status())
}

async fn mon_stat(State(m): St) -> axum::Json<api::MonStatus> {
    axum::Json(m.mon_status())
}

async fn osdmap(State(m): St) -> axum::Json<api::MapView> {
    axum::Json(api::MapView::of(&m.sm.shared.read().expect("state lock").cluster.osdmap))
}

#[derive(Debug, Deserialize)]
struct ObjectMapQuery {
    pool: String,
    object: String,
}

/// Where an object lives: its PG, the PG's placement, up set and primary.
async fn osd_map(
    State(m): St,
    Query(q): Query<ObjectMapQuery>,
) -> Result<axum::Json<api::ObjectMapView>, Failure> {
    use crate::maps::placement::{object_pg, pg_mapping};
    let st = m.sm.shared.read().expect("state lock");
    let map = &st.cluster.osdmap;
    let pool = map
        .pool_by_name(&q.pool)
        .ok_or_else(|| Failure::new(ErrorKind::Rejected, format!("no pool named {:?}", q.pool)))?;
    let pg = object_pg(pool, &q.object);
    let mapping = pg_mapping(map, pool, pg);
    Ok(axum::Json(api::ObjectMapView {
        epoch: map.epoch,
        pool: pool.name.clone(),
        pool_id: pool.id.0,
        object: q.object,
        pg: pg.to_string(),
        placement: mapping.placement.iter().map(|o| o.0).collect(),
        up: mapping.up.iter().map(|o| o.0).collect(),
        primary: mapping.primary().map(|o| o.0),
    }))
}

async fn config(State(m): St) -> axum::Json<BTreeMap<String, String>> {
    axum::Json(m.sm.shared.read().expect("state lock").cluster.config.clone())
}

fn forwarded(h: &HeaderMap) -> bool {
    h.contains_key(api::FORWARDED_HEADER)
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| Failure::new(ErrorKind::BadRequest, e.to_string()))
}

async fn command(State(m): St, h: HeaderMap, body: Bytes) -> Result<axum::Json<Response>, Failure> {
    let cmd: Command = parse(&body)?;
    if matches!(
        cmd,
        Command::AuthRotate { .. }
            | Command::AuthPut { .. }
            | Command::AuthRm { .. }
            | Command::AuthCaps { .. }
    ) {
        return Err(Failure::new(
            ErrorKind::Rejected,
            "the key database changes only through signed requests (POST /v1/auth/command)",
        ));
    }
    if !m.is_leader()
        && let Some(l) = m.leader()
        && !forwarded(&h)
        && l != m.me
    {
        // With the caller's signature: the leader checks it too.
        let bytes = m
            .forward_with(l, "/v1/command", body.to_vec(), h.get(sluice_auth::request::HEADER))
            .await?;
        return Ok(axum::Json(parse(&bytes)?));
    }
    Ok(axum::Json(m.submit(cmd, forwarded(&h)).await?))
}

fn no_keys(m: &Monitor) -> Failure {
    Failure::new(
        ErrorKind::Unauthenticated,
        format!(
            "mon.{} holds no keys: this cluster was made without a keyring and runs only with \
             auth = \"none\"",
            m.name
        ),
    )
}

/// The first step of a login: a challenge only a monitor of this cluster could make.
async fn auth_challenge(State(m): St) -> Result<axum::Json<kdc::ServerChallenge>, Failure> {
    let st = m.sm.shared.read().expect("state lock");
    let key = st.cluster.auth.mon_key().ok_or_else(|| no_keys(&m))?;
    Ok(axum::Json(kdc::make_challenge(key, auth::wall_ms())))
}

/// The second: the proof checked against this monitor's replica of the keys, and the
/// session key and tickets sealed for the caller. No Raft write.
async fn auth_session(
    State(m): St,
    body: Bytes,
) -> Result<axum::Json<kdc::SessionKeyReply>, Failure> {
    let req: kdc::SessionKeyRequest = parse(&body)?;
    let st = m.sm.shared.read().expect("state lock");
    let a = &st.cluster.auth;
    let key = a.mon_key().ok_or_else(|| no_keys(&m))?;
    // The monitors' own key is not a login.
    let lookup = |e: &sluice_auth::EntityName| {
        (*e != sluice_auth::EntityName::mon()).then(|| a.entities.get(e).cloned()).flatten()
    };
    let new_gid = || sluice_auth::secret::random_u64() >> 1 | 1;
    let r = kdc::issue(
        &req,
        key,
        lookup,
        &a.rotating,
        new_gid,
        auth::policy(&st.cluster.config),
        auth::wall_ms(),
    );
    match r {
        Ok(reply) => {
            m.counters.auth_logins.fetch_add(1, Ordering::Relaxed);
            Ok(axum::Json(reply))
        }
        Err(e) => {
            m.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("login of {} refused: {e}", req.entity);
            Err(Failure::new(ErrorKind::Unauthenticated, e.to_string()))
        }
    }
}

/// Checks the request's signature (`sluice_auth::request`): who asks, with which caps at
/// the monitors, and the session key to seal a reply with.
/// The answer to a request without a signature on a cluster with keys.
fn unsigned(method: &str, path: &str) -> Failure {
    Failure::new(
        ErrorKind::Unauthenticated,
        format!(
            "{method} {path} needs a signed request ({} header): this cluster runs with \
             authentication; log in with a key (is auth = \"none\" in your sluice.conf?)",
            sluice_auth::request::HEADER
        ),
    )
}

/// A signed request whose entity's caps do not allow it.
fn denied(ticket: &sluice_auth::AuthTicket, why: impl std::fmt::Display) -> Failure {
    Failure::new(ErrorKind::PermissionDenied, format!("{}: {why}", ticket.entity))
}

fn signed_by(
    m: &Monitor,
    h: &HeaderMap,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(sluice_auth::AuthTicket, sluice_auth::Secret), Failure> {
    let Some(v) = h.get(sluice_auth::request::HEADER) else {
        return Err(unsigned(method, path));
    };
    let v =
        v.to_str().map_err(|_| Failure::new(ErrorKind::Unauthenticated, "unreadable signature"))?;
    let key =
        m.sm.shared
            .read()
            .expect("state lock")
            .cluster
            .auth
            .mon_key()
            .cloned()
            .ok_or_else(|| no_keys(m))?;
    let (mut ticket, sk) = {
        // Reads may be replayed harmlessly: they take no room in the replay cache.
        let mut replays = m.replays.lock().expect("lock");
        let cache = (method != "GET").then_some(&mut *replays);
        sluice_auth::request::verify(v, &key, method, path, body, auth::wall_ms(), cache).map_err(
            |e| {
                m.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                match e {
                    // A full replay cache: try again shortly (or another monitor).
                    sluice_auth::AuthError::Busy => {
                        Failure::new(ErrorKind::NoQuorum, format!("mon.{}: {e}", m.name))
                    }
                    e => Failure::new(ErrorKind::Unauthenticated, e.to_string()),
                }
            },
        )?
    };
    // The database as it is now decides, not the ticket: a removed or demoted entity
    // loses the management API at once, not when its ticket expires.
    let st = m.sm.shared.read().expect("state lock");
    let Some(rec) = st.cluster.auth.entities.get(&ticket.entity) else {
        return Err(Failure::new(
            ErrorKind::Unauthenticated,
            format!("{} is no longer in the key database", ticket.entity),
        ));
    };
    ticket.caps = rec.caps_at(sluice_auth::Service::Mon);
    Ok((ticket, sk))
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct RotatingRequest {
    pub service: sluice_auth::Service,
}

/// A daemon fetching its service's rotating secrets (mon cap `x`, e.g. `profile osd`),
/// sealed under its session key.
async fn auth_rotating(
    State(m): St,
    h: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<Vec<u8>>, Failure> {
    let (ticket, sk) = signed_by(&m, &h, "POST", "/v1/auth/rotating", &body)?;
    let req: RotatingRequest = parse(&body)?;
    ticket.caps.check(sluice_auth::Perms::X, None).map_err(|e| {
        tracing::warn!("{} may not fetch {} secrets: {e}", ticket.entity, req.service);
        denied(&ticket, e)
    })?;
    // A service's secrets let their holder mint its tickets: only its own daemons get
    // them (the monitors hold theirs already).
    let own = match req.service {
        sluice_auth::Service::Osd => ticket.entity.kind() == sluice_auth::EntityKind::Osd,
        sluice_auth::Service::Mon => false,
    };
    if !own {
        return Err(Failure::new(
            ErrorKind::PermissionDenied,
            format!(
                "{}: only the {} daemons get the {} secrets",
                ticket.entity, req.service, req.service
            ),
        ));
    }
    let st = m.sm.shared.read().expect("state lock");
    let secrets = st.cluster.auth.rotating.get(&req.service).ok_or_else(|| no_keys(&m))?;
    Ok(axum::Json(sluice_auth::request::seal_reply(&sk, b"rotating", secrets)))
}

/// The key database (`sluice auth ...`): signed requests from an entity with mon cap
/// `*`, answers sealed under its session key (keys never travel in the clear). Changes
/// go to the leader, which checks the signature itself; reads come from this replica.
async fn auth_command(
    State(m): St,
    h: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<Vec<u8>>, Failure> {
    use auth::{AuthAnswer, AuthOp};
    const PATH: &str = "/v1/auth/command";
    let op: AuthOp = parse(&body)?;
    let changes = !matches!(op, AuthOp::Get { .. } | AuthOp::Ls);
    if changes && !m.is_leader() {
        // Read your writes: the caller's next request (a login with the new key, say)
        // may come to this monitor before it applied the change.
        let done = |st: &ClusterState| match &op {
            AuthOp::Add { entity, .. } | AuthOp::GetOrCreate { entity, .. } => {
                st.auth.entities.contains_key(entity)
            }
            AuthOp::Rm { entity } => !st.auth.entities.contains_key(entity),
            AuthOp::Caps { entity, caps } => st
                .auth
                .entities
                .get(entity)
                .is_some_and(|r| auth::parse_caps(caps).is_ok_and(|c| c == r.caps)),
            AuthOp::Get { .. } | AuthOp::Ls => true,
        };
        let bytes = m.forward_signed_then_wait(&h, PATH, &body, done).await?;
        return Ok(axum::Json(parse(&bytes)?));
    }
    let (ticket, sk) = signed_by(&m, &h, "POST", PATH, &body)?;
    ticket.caps.check(sluice_auth::Perms::ADMIN, None).map_err(|e| denied(&ticket, e))?;
    let caps_of = |c: &std::collections::BTreeMap<sluice_auth::Service, String>| {
        auth::parse_caps(c).map_err(|e| Failure::new(ErrorKind::Rejected, e))
    };
    let entity_answer = |entity, r: Response| match r {
        Response::AuthEntity { record, created } => {
            Ok(AuthAnswer::entity(entity, &record, created))
        }
        other => Err(Failure::new(ErrorKind::Internal, format!("answered {other:?}"))),
    };
    let put = match &op {
        AuthOp::Add { entity, caps } => Some((entity.clone(), caps.clone(), false)),
        AuthOp::GetOrCreate { entity, caps } => Some((entity.clone(), caps.clone(), true)),
        _ => None,
    };
    let answer = match op {
        AuthOp::Add { .. } | AuthOp::GetOrCreate { .. } => {
            let (entity, caps, keep_existing) = put.expect("an add");
            let record = sluice_auth::kdc::EntityRecord {
                key: sluice_auth::Secret::generate(),
                caps: caps_of(&caps)?,
            };
            let cmd = Command::AuthPut { entity: entity.clone(), record, keep_existing };
            entity_answer(entity, m.submit(cmd, true).await?)?
        }
        AuthOp::Caps { entity, caps } => {
            let cmd = Command::AuthCaps { entity: entity.clone(), caps: caps_of(&caps)? };
            entity_answer(entity, m.submit(cmd, true).await?)?
        }
        AuthOp::Rm { entity } => {
            m.submit(Command::AuthRm { entity }, true).await?;
            AuthAnswer::Done
        }
        AuthOp::Get { entity } => {
            let st = m.sm.shared.read().expect("state lock");
            let r = st
                .cluster
                .auth
                .entities
                .get(&entity)
                .filter(|_| entity != sluice_auth::EntityName::mon())
                .ok_or_else(|| {
                    Failure::new(ErrorKind::Rejected, format!("{entity} does not exist"))
                })?;
            AuthAnswer::entity(entity, r, false)
        }
        AuthOp::Ls => {
            let st = m.sm.shared.read().expect("state lock");
            AuthAnswer::List(
                st.cluster
                    .auth
                    .entities
                    .iter()
                    .filter(|(e, _)| **e != sluice_auth::EntityName::mon())
                    .map(|(e, r)| (e.clone(), auth::caps_text(&r.caps)))
                    .collect(),
            )
        }
    };
    tracing::info!("{} ran an auth command", ticket.entity);
    Ok(axum::Json(sluice_auth::request::seal_reply(&sk, b"auth", &answer)))
}

/// Runs `local` on the leader; elsewhere forwards the request to it.
async fn on_leader<T: serde::Serialize + serde::de::DeserializeOwned>(
    m: &Monitor,
    h: &HeaderMap,
    path: &str,
    body: Bytes,
    local: impl AsyncFnOnce() -> Result<T, Failure>,
) -> Result<axum::Json<T>, Failure> {
    if m.is_leader() {
        return Ok(axum::Json(local().await?));
    }
    match m.leader() {
        Some(l) if !forwarded(h) && l != m.me => {
            let sig = h.get(sluice_auth::request::HEADER);
            let bytes = m.forward_with(l, path, body.to_vec(), sig).await?;
            Ok(axum::Json(parse(&bytes)?))
        }
        _ => Err(Failure::new(ErrorKind::NoQuorum, m.no_quorum_message(&m.mon_status()))),
    }
}

async fn osd_boot(
    State(m): St,
    h: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<api::BootReply>, Failure> {
    let req: api::BootRequest = parse(&body)?;
    on_leader(&m, &h, "/v1/osd/boot", body, async || {
        let r = m
            .submit(
                Command::RegisterOsd {
                    uuid: req.uuid,
                    location: req.location.clone(),
                    weight: req.weight,
                },
                true,
            )
            .await?;
        let Response::Registered { id, .. } = r else {
            return Err(Failure::new(ErrorKind::Internal, format!("registration answered {r:?}")));
        };
        let r =
            m.submit(Command::Boot { id, uuid: req.uuid, addrs: req.addrs.clone() }, true).await?;
        m.with_detector(|d, now| d.beacon(id, now));
        Ok(match r {
            Response::BootDeferred { epoch } => api::BootReply { id, epoch, deferred: true },
            Response::Done { epoch } | Response::Registered { epoch, .. } => {
                tracing::info!("{id} booted at epoch {epoch}");
                api::BootReply { id, epoch, deferred: false }
            }
            Response::AuthEntity { .. } => {
                return Err(Failure::new(ErrorKind::Internal, "boot answered with an entity"));
            }
        })
    })
    .await
}

/// Registers a new OSD and stores the key it made (`api::OsdNewRequest`): signed by an
/// entity with mon 'profile bootstrap-osd' or 'allow *', answered sealed under its
/// session key. The leader checks the
/// signature; a follower forwards it and answers once its replica has the key (the OSD
/// logs in with it next, perhaps here).
async fn osd_new(State(m): St, h: HeaderMap, body: Bytes) -> Result<axum::Json<Vec<u8>>, Failure> {
    const PATH: &str = "/v1/osd/new";
    let req: api::OsdNewRequest = parse(&body)?;
    if !m.is_leader() {
        // Answered once this replica has the key: the OSD logs in with it next.
        let registered = |st: &ClusterState| {
            st.osdmap.osds.values().find(|o| o.uuid == req.uuid).is_some_and(|o| {
                st.auth.entities.contains_key(&sluice_auth::EntityName::osd(o.id.0))
            })
        };
        let bytes = m.forward_signed_then_wait(&h, PATH, &body, registered).await?;
        return Ok(axum::Json(parse(&bytes)?));
    }
    let (ticket, sk) = signed_by(&m, &h, "POST", PATH, &body)?;
    // A dedicated cap: whoever registers OSDs names their keys, and an OSD key reaches
    // the OSD secrets (so every pool). Mon 'w' (pool management) is not enough.
    if !(ticket.caps.has_profile(sluice_auth::caps::Profile::BootstrapOsd)
        || ticket.caps.allows(sluice_auth::Perms::ALL, None))
    {
        tracing::warn!("{} may not register OSDs", ticket.entity);
        return Err(Failure::new(
            ErrorKind::PermissionDenied,
            format!(
                "{}: registering an OSD needs mon 'profile bootstrap-osd' or 'allow *' (has mon '{}')",
                ticket.entity, ticket.caps
            ),
        ));
    }
    let key: sluice_auth::Secret =
        sluice_auth::request::open_reply(&sk, b"osd-new-key", &req.key_sealed).map_err(|e| {
            Failure::new(ErrorKind::BadRequest, format!("the sealed OSD key does not open: {e}"))
        })?;
    let r = m
        .submit(
            Command::RegisterOsd { uuid: req.uuid, location: req.location, weight: req.weight },
            true,
        )
        .await?;
    let Response::Registered { id, .. } = r else {
        return Err(Failure::new(ErrorKind::Internal, format!("registration answered {r:?}")));
    };
    let entity = sluice_auth::EntityName::osd(id.0);
    let caps = sluice_auth::Service::ALL
        .into_iter()
        .map(|s| (s, "profile osd".to_string()))
        .collect::<BTreeMap<_, _>>();
    let record = sluice_auth::kdc::EntityRecord {
        key: key.clone(),
        caps: auth::parse_caps(&caps).map_err(|e| Failure::new(ErrorKind::Internal, e))?,
    };
    let cmd = Command::AuthPut { entity: entity.clone(), record, keep_existing: true };
    let Response::AuthEntity { record, created } = m.submit(cmd, true).await? else {
        return Err(Failure::new(ErrorKind::Internal, "key creation answered otherwise"));
    };
    // The same key again is a retry; another key is refused (keys are never handed out
    // here: the OSD made its own).
    if record.key != key {
        return Err(Failure::new(
            ErrorKind::Rejected,
            format!(
                "{entity} (uuid {}) has another key already: if this is that OSD and its \
                 keyring was lost, remove the old key with `sluice auth rm {entity}` first",
                format_fsid(&req.uuid)
            ),
        ));
    }
    tracing::info!(
        "{} registered {id}{}",
        ticket.entity,
        if created { " and stored its key" } else { " (again: same key)" }
    );
    let reply = api::OsdNewReply { id, entity, caps: auth::caps_text(&record.caps) };
    Ok(axum::Json(sluice_auth::request::seal_reply(&sk, b"osd-new", &reply)))
}

async fn osd_beacon(State(m): St, h: HeaderMap, body: Bytes) -> Result<axum::Json<u64>, Failure> {
    let b: api::Beacon = parse(&body)?;
    on_leader(&m, &h, "/v1/osd/beacon", body, async || {
        let st = m.sm.shared.read().expect("state lock");
        match st.cluster.osdmap.osd(b.id) {
            Some(o) if o.uuid == b.uuid => {}
            _ => {
                return Err(Failure::new(
                    ErrorKind::Rejected,
                    format!("{} is not registered with that uuid", b.id),
                ));
            }
        }
        let epoch = st.cluster.osdmap.epoch;
        drop(st);
        m.with_detector(|d, now| d.beacon(b.id, now));
        Ok(epoch)
    })
    .await
}

/// An OSD's PG report: kept by this monitor (every OSD reports to every monitor). The
/// answer carries the scrubs asked of this monitor for PGs the OSD leads.
async fn osd_pgstats(State(m): St, body: Bytes) -> Result<axum::Json<api::PgStatsAck>, Failure> {
    let r: api::PgStatsReport = parse(&body)?;
    let st = m.sm.shared.read().expect("state lock");
    match st.cluster.osdmap.osd(r.id) {
        Some(o) if o.uuid == r.uuid => {}
        _ => {
            return Err(Failure::new(
                ErrorKind::Rejected,
                format!("{} is not registered with that uuid", r.id),
            ));
        }
    }
    let epoch = st.cluster.osdmap.epoch;
    let id = r.id;
    let mut stats = m.pg_stats.lock().expect("pg stats lock");
    stats.record(r, Instant::now());
    let scrub = stats.take_scrubs(&st.cluster.osdmap, id);
    Ok(axum::Json(api::PgStatsAck { epoch, scrub }))
}

/// `POST /v1/pg/scrub`: queued for the PG's primary (see `api::ScrubRequest`).
async fn pg_scrub(State(m): St, body: Bytes) -> Result<axum::Json<api::ScrubRequest>, Failure> {
    let mut r: api::ScrubRequest = parse(&body)?;
    let st = m.sm.shared.read().expect("state lock");
    let map = &st.cluster.osdmap;
    let found = map.pools.values().find_map(|pool| {
        (0..pool.pg_num)
            .map(|n| crate::maps::placement::PgId { pool: pool.id, pg: n })
            .find(|pgid| pgid.to_string() == r.pgid)
    });
    let Some(pgid) = found else {
        return Err(Failure::new(
            ErrorKind::Rejected,
            format!("no PG {} at osdmap e{} (POOL.PG, the PG in hex)", r.pgid, map.epoch),
        ));
    };
    (r.pool, r.pg) = (pgid.pool.0, pgid.pg);
    m.pg_stats.lock().expect("pg stats lock").request_scrub(r.clone());
    Ok(axum::Json(r))
}

async fn pg_stats(State(m): St) -> axum::Json<api::PgTable> {
    axum::Json(m.pg_table())
}

async fn osd_failure(State(m): St, h: HeaderMap, body: Bytes) -> Result<axum::Json<bool>, Failure> {
    let r: api::FailureReport = parse(&body)?;
    on_leader(&m, &h, "/v1/osd/failure", body, async || {
        m.with_detector(|d, now| {
            if r.failed {
                d.report_failure(r.reporter, r.target, now)
            } else {
                d.report_alive(r.reporter, r.target)
            }
        });
        Ok(true)
    })
    .await
}

#[derive(Debug, Deserialize)]
struct SubscribeQuery {
    /// The epoch the subscriber has (0: none).
    have: u64,
    /// How long to wait for a newer epoch before answering with nothing new.
    #[serde(default)]
    wait_ms: u64,
}

async fn subscribe(State(m): St, Query(q): Query<SubscribeQuery>) -> HttpResponse {
    let mut rx = m.sm.epoch.subscribe();
    if *rx.borrow_and_update() <= q.have && q.wait_ms > 0 {
        let wait = Duration::from_millis(q.wait_ms.min(30_000));
        let _ = tokio::time::timeout(wait, rx.wait_for(|e| *e > q.have)).await;
    }
    let st = m.sm.shared.read().expect("state lock");
    let (full, incrementals) = match st.cluster.catch_up(q.have) {
        Catchup::UpToDate => (None, Vec::new()),
        Catchup::Incrementals(v) => (None, v.into_iter().cloned().collect()),
        Catchup::FullMap(map) => (Some(map.clone()), Vec::new()),
    };
    let u = api::MapUpdate { full, incrementals, config: st.cluster.config.clone() };
    binary(envelope::seal(Kind::MapUpdate, api::MAP_UPDATE_VERSION, api::MAP_UPDATE_VERSION, &u))
}

/// Serves until `shutdown` resolves, then stops Raft.
pub async fn serve(
    m: Arc<Monitor>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!("mon.{} serving on {addr}", m.name);
    m.spawn_background();
    axum::serve(listener, router(Arc::clone(&m))).with_graceful_shutdown(shutdown).await?;
    if let Err(e) = m.raft.shutdown().await {
        tracing::warn!("stopping Raft: {e}");
    }
    Ok(())
}
