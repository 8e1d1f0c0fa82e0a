//! The OSD's side of the lifecycle, run by `sluice-osd` on a control thread (never on a
//! dataplane core): boot against the monitors (an id is assigned on first boot, by uuid),
//! follow every map epoch in order through a subscription, send beacons, heartbeat the
//! peer OSDs over UDP and report the ones that stop answering, boot again when the map
//! says this OSD is down while it is alive, and mark itself down when stopped.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::api::{self, BootReply, BootRequest, MapUpdate};
use crate::client::MonClient;
use crate::conf::Conf;
use crate::maps::envelope::{self, Kind};
use crate::maps::{Location, OsdAddrs, OsdId, OsdMap};
use crate::monclient::Policy;
use crate::state::Command;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub conf: Conf,
    pub uuid: [u8; 16],
    pub location: Location,
    /// 16.16 fixed point.
    pub weight: u32,
    /// The address peers and monitors reach this OSD's control side on.
    pub public_ip: IpAddr,
    /// One dataplane port per core.
    pub core_ports: Vec<u16>,
}

/// What the agent has learned, for the daemon's logs and for tests.
#[derive(Debug, Clone, Default)]
pub struct AgentState {
    pub id: Option<OsdId>,
    pub epoch: u64,
    pub up: bool,
    pub boots: u32,
}

const HB_VERSION: u16 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    fsid: [u8; 16],
    from: OsdId,
    seq: u64,
    reply: bool,
}

#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    up_from: u64,
    /// When we started expecting answers (it came up in our map).
    since: Instant,
    last_reply: Option<Instant>,
    reported: bool,
}

fn secs(cfg: &BTreeMap<String, String>, key: &str, default: f64) -> Duration {
    Duration::from_secs_f64(api::config_secs(cfg, key, default).max(0.05))
}

/// Runs until `shutdown` turns true. Errors talking to the monitors are retried (the
/// monitor client fails over); only a local failure (no socket) ends the agent early.
pub async fn run(
    cfg: AgentConfig,
    mut shutdown: watch::Receiver<bool>,
    state: watch::Sender<AgentState>,
) -> anyhow::Result<()> {
    let sock = UdpSocket::bind((cfg.public_ip, 0)).await?;
    let public = sock.local_addr()?;
    let addrs = OsdAddrs { public, core_ports: cfg.core_ports.clone() };
    let client_id = u64::from_le_bytes(cfg.uuid[..8].try_into().expect("8 bytes"));
    let mon = MonClient::from_conf(&cfg.conf, client_id);
    mon.start_background_check();
    let fsid = cfg.conf.fsid;

    let boot_req =
        BootRequest { uuid: cfg.uuid, location: cfg.location.clone(), weight: cfg.weight, addrs };
    let mut map = OsdMap::new(fsid);
    let mut config: BTreeMap<String, String> = BTreeMap::new();
    let mut me: Option<OsdId> = None;
    let mut need_boot = true;
    // The epoch of our last boot: only a later map saying we are down means it.
    let mut boot_epoch = u64::MAX;
    let mut peers: BTreeMap<OsdId, Peer> = BTreeMap::new();
    let mut seq = 0u64;
    let mut next_beacon = Instant::now();
    let mut next_ping = Instant::now();
    let mut buf = vec![0u8; 512];

    // Subscription: a long poll in its own task, feeding updates through a channel.
    let (upd_tx, mut upd_rx) = tokio::sync::mpsc::channel::<MapUpdate>(4);
    let (have_tx, have_rx) = watch::channel(0u64);
    {
        let mon = mon.clone();
        tokio::spawn(async move {
            loop {
                let have = *have_rx.borrow();
                let path = format!("/v1/subscribe?have={have}&wait_ms=10000");
                match mon.get_bytes(&path, Duration::from_secs(10)).await {
                    Ok(b) => match envelope::open::<MapUpdate>(
                        Kind::MapUpdate,
                        api::MAP_UPDATE_VERSION,
                        &b,
                    ) {
                        Ok(u) => {
                            if upd_tx.send(u).await.is_err() {
                                return;
                            }
                            // Wait until the agent has taken it in before asking again.
                            let mut rx = have_rx.clone();
                            let _ = tokio::time::timeout(
                                Duration::from_secs(1),
                                rx.wait_for(|h| *h != have),
                            )
                            .await;
                        }
                        Err(e) => {
                            tracing::warn!("map update undecodable: {e}");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    },
                    Err(e) => {
                        tracing::warn!("subscription: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
    }

    loop {
        if *shutdown.borrow() {
            break;
        }
        if need_boot {
            match mon.post::<_, BootReply>("/v1/osd/boot", &boot_req).await {
                Ok(r) if r.deferred => {
                    tracing::info!("{}: boot deferred (noup is set)", r.id);
                    me = Some(r.id);
                    need_boot = false; // booted again when noup clears (map update)
                    boot_epoch = r.epoch;
                }
                Ok(r) => {
                    tracing::info!("booted as {} at epoch {}", r.id, r.epoch);
                    me = Some(r.id);
                    need_boot = false;
                    boot_epoch = r.epoch;
                    state.send_modify(|s| {
                        s.id = Some(r.id);
                        s.boots += 1;
                    });
                    next_beacon = Instant::now() + secs(&config, "osd_beacon_interval", 5.0);
                }
                Err(e) => {
                    tracing::warn!("boot: {e}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
            }
        }
        let wake = next_beacon.min(next_ping);
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
            Some(u) = upd_rx.recv() => {
                let before = map.epoch;
                if let Some(full) = u.full {
                    map = full;
                }
                for inc in &u.incrementals {
                    if inc.epoch <= map.epoch {
                        continue;
                    }
                    if let Err(e) = map.apply(inc) {
                        // Out of order or damaged: start again from a full map.
                        tracing::warn!("map epoch {}: {e}; refetching the full map", inc.epoch);
                        map = OsdMap::new(fsid);
                        break;
                    }
                }
                config = u.config;
                let policy = config.get("mon_client_selection").and_then(|p| p.parse::<Policy>().ok());
                if let Some(p) = policy {
                    mon.reconfigure(p, secs(&config, "mon_client_check_interval", cfg.conf.mon_check_interval.as_secs_f64()));
                }
                let _ = have_tx.send(map.epoch);
                if map.epoch != before {
                    tracing::debug!("map epoch {} -> {}", before, map.epoch);
                }
                if let Some(id) = me {
                    let o = map.osd(id);
                    let up = o.is_some_and(|o| o.up);
                    state.send_modify(|s| { s.epoch = map.epoch; s.up = up; });
                    if !up && !map.flags.noup && o.is_some_and(|o| o.uuid == cfg.uuid) && map.epoch > boot_epoch {
                        let was = o.map_or(0, |o| o.down_at);
                        tracing::warn!("map epoch {} says {id} is down (since epoch {was}) while it is alive: booting again", map.epoch);
                        need_boot = true;
                    }
                }
                // Peers: every up OSD but us; a new interval resets its clock.
                let now = Instant::now();
                let up: BTreeMap<OsdId, (SocketAddr, u64)> = map
                    .osds
                    .values()
                    .filter(|o| o.up && Some(o.id) != me)
                    .filter_map(|o| o.addrs.as_ref().map(|a| (o.id, (a.public, o.up_from))))
                    .collect();
                peers.retain(|id, p| up.get(id).is_some_and(|(a, f)| *a == p.addr && *f == p.up_from));
                for (id, (addr, up_from)) in up {
                    peers.entry(id).or_insert(Peer { addr, up_from, since: now, last_reply: None, reported: false });
                }
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let Ok(hb) = envelope::open::<Heartbeat>(Kind::Heartbeat, HB_VERSION, &buf[..n]) else {
                    tracing::debug!("garbage heartbeat from {from}");
                    continue;
                };
                if hb.fsid != fsid {
                    tracing::warn!("heartbeat from {from} of another cluster ignored");
                    continue;
                }
                if hb.reply {
                    if let Some(p) = peers.get_mut(&hb.from) {
                        p.last_reply = Some(Instant::now());
                    }
                } else if let Some(id) = me {
                    let pong = Heartbeat { fsid, from: id, seq: hb.seq, reply: true };
                    let _ = sock.send_to(&envelope::seal(Kind::Heartbeat, HB_VERSION, HB_VERSION, &pong), from).await;
                }
            }
        }
        let Some(id) = me else { continue };
        let now = Instant::now();
        if now >= next_beacon {
            next_beacon = now + secs(&config, "osd_beacon_interval", 5.0);
            let b = api::Beacon { id, uuid: cfg.uuid, epoch: map.epoch };
            if let Err(e) = mon.post::<_, u64>("/v1/osd/beacon", &b).await {
                tracing::warn!("beacon: {e}");
            }
        }
        if now >= next_ping {
            next_ping = now + secs(&config, "osd_heartbeat_interval", 1.0);
            let grace = secs(&config, "osd_heartbeat_grace", 20.0);
            seq += 1;
            let ping = envelope::seal(
                Kind::Heartbeat,
                HB_VERSION,
                HB_VERSION,
                &Heartbeat { fsid, from: id, seq, reply: false },
            );
            let mut reports = Vec::new();
            for (pid, p) in peers.iter_mut() {
                let _ = sock.send_to(&ping, p.addr).await;
                let heard = p.last_reply.unwrap_or(p.since);
                let failed = now.duration_since(heard) > grace;
                if failed {
                    // Re-sent every interval: the monitor only counts recent reports.
                    reports.push(api::FailureReport { reporter: id, target: *pid, failed: true });
                    p.reported = true;
                } else if p.reported {
                    reports.push(api::FailureReport { reporter: id, target: *pid, failed: false });
                    p.reported = false;
                }
            }
            for r in reports {
                if r.failed {
                    tracing::info!("{} does not answer heartbeats: reporting it", r.target);
                }
                if let Err(e) = mon.post::<_, bool>("/v1/osd/failure", &r).await {
                    tracing::warn!("failure report: {e}");
                }
            }
        }
    }
    // Graceful stop: tell the monitors now rather than letting them find out.
    if let Some(id) = me {
        let mut quick = mon.clone();
        quick.deadline = Duration::from_secs(3);
        quick.attempt_timeout = Duration::from_secs(2);
        let cmd = Command::MarkDown { ids: vec![id], by_operator: true };
        match quick.post::<_, crate::state::Response>("/v1/command", &cmd).await {
            Ok(_) => tracing::info!("{id} marked itself down"),
            Err(e) => tracing::warn!("could not mark {id} down ({e}); the monitors will notice"),
        }
    }
    Ok(())
}
