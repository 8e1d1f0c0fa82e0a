//! Replication between in-process OSDs: one reactor thread each, RAM devices behind
//! fault injectors, real loopback TCP between them, maps made by the test (no monitor).
//! A replica's device fails under writes: the client's write is parked (never failed),
//! the PG peers again, leaves the failed member behind, and answers the write once
//! enough copies are durable; with too few, the write waits.
//!
//! States are awaited with generous deadlines. The one absence check (a write that
//! must not be answered while too few copies exist) cannot pass wrongly by being slow.

use std::net::SocketAddr;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use sluice_control::maps::osdmap::{
    FailureDomain, Location, Maintenance, ONE, OsdAddrs, OsdInfo, Pool,
};
use sluice_control::maps::placement;
use sluice_control::maps::{OsdId, OsdMap, PoolId};
use sluice_control::osd_agent::{CorePgReport, PgReportRx};
use sluice_dataplane::osd::{CoreCmd, CoreMsg, MapView, OsdCore, OsdTuning};
use sluice_dataplane::reactor::{self, ReactorConfig};
use sluice_dataplane::store::{MkfsOptions, Shard, StoreConfig, mkfs};
use sluice_dataplane::{ParkState, PollMode, ReactorHandle, Waker, mesh};
use sluice_net::frame::Limits;
use sluice_net::ops::{self, Body, Op, Reply, Request, Status};
use sluice_net::session::{self, Event};
use sluice_net::tcp::{ClientConn, Server};
use sluice_nvme::{FaultHandle, FaultRule, FaultyDevice, IoError, OpSet, RamDevice, RamMedia};
use sluice_vocab::{CoreId, Lba, SystemClock};

/// The read lease of the OSDs' primaries: short, so a new interval's wait for the
/// previous primary's lease stays short.
const LEASE: Duration = Duration::from_secs(2);

fn tuning() -> OsdTuning {
    OsdTuning { read_lease: LEASE, ..OsdTuning::default() }
}

struct Osd {
    _reactor: ReactorHandle,
    maps: mpsc::Sender<MapView>,
    waker: Waker,
    port: u16,
    faults: FaultHandle,
    reports: tokio::sync::mpsc::UnboundedReceiver<CorePgReport>,
    /// The device's bytes (to corrupt), and commands for the core (scrubs).
    media: Arc<RamMedia>,
    commands: mpsc::Sender<CoreCmd>,
}

fn start_osd() -> Osd {
    let ram = RamDevice::new(64 << 20, 64);
    let media = Arc::clone(ram.media());
    let mut dev = FaultyDevice::new(ram, Arc::new(SystemClock));
    let opts = MkfsOptions { shards: 1, segment_bytes: Some(1 << 20), ..Default::default() };
    mkfs(&mut dev, &opts).unwrap();
    let faults = dev.handle();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let park = ParkState::new().unwrap();
    let waker = Waker::new(Arc::clone(&park));
    let (mut outs, mut ins) = mesh::<CoreMsg>(vec![waker.clone()], 0, 64);
    let (outbox, inbox) = (outs.remove(0), ins.remove(0));
    let (maps, map_rx) = mpsc::channel();
    let (commands, cmd_rx) = mpsc::channel();
    let (pg_tx, pg_rx) = PgReportRx::channel();
    let reports = pg_rx.0.lock().unwrap().take().unwrap();
    let cfg =
        ReactorConfig { core: CoreId(0), cpu: None, mode: PollMode::park(PollMode::DEFAULT_SPIN) };
    let reactor = reactor::spawn(cfg, park, move |r| {
        let shard = Shard::open(dev, 0, StoreConfig::default())
            .map_err(|f| std::io::Error::other(f.error.to_string()))?;
        let server = Server::from_listener(listener, ops::FEATURES, Limits::DEFAULT)?;
        let mut core = OsdCore::open(shard, server, 0, 1, outbox, inbox, map_rx, None)
            .map_err(std::io::Error::other)?;
        core.report_pgs_to(pg_tx);
        core.commands_from(cmd_rx);
        r.add_poller(Box::new(core)).map(|_| ())
    })
    .unwrap();
    Osd { _reactor: reactor, maps, waker, port, faults, reports, media, commands }
}

/// Every OSD up on its own host, one pool of size 3 / min_size 2 with one PG.
fn map(ports: &[u16], epoch: u64) -> OsdMap {
    let mut m = OsdMap::new([9; 16]);
    m.epoch = epoch;
    for (i, port) in ports.iter().enumerate() {
        let id = OsdId(i as u32);
        m.osds.insert(
            id,
            OsdInfo {
                id,
                uuid: [i as u8 + 1; 16],
                addrs: Some(OsdAddrs {
                    public: "127.0.0.1:1".parse().unwrap(),
                    core_ports: vec![*port],
                }),
                location: Location { rack: "r".into(), host: format!("h{i}") },
                weight: ONE,
                up: true,
                is_in: true,
                primary_affinity: ONE,
                maintenance: Maintenance::None,
                up_from: 1,
                down_at: 0,
            },
        );
    }
    m.pools.insert(
        PoolId(1),
        Pool {
            id: PoolId(1),
            name: "p".into(),
            size: 3,
            min_size: 2,
            pg_num: 1,
            failure_domain: FailureDomain::Host,
        },
    );
    m
}

struct Cluster {
    osds: Vec<Osd>,
    map: Arc<OsdMap>,
    /// Primary first.
    acting: Vec<OsdId>,
    client: ClientConn,
    tid: u64,
    replies: std::collections::HashMap<u64, (Status, Vec<u8>)>,
    cookie: u64,
    /// The newest scrub and deep-scrub times the primary reported.
    scrubbed: (u64, u64),
    /// What [`Cluster::publish`] hands the OSDs with a map.
    tuning: OsdTuning,
}

impl Cluster {
    fn start() -> Cluster {
        let osds: Vec<Osd> = (0..3).map(|_| start_osd()).collect();
        let ports: Vec<u16> = osds.iter().map(|o| o.port).collect();
        let map = Arc::new(map(&ports, 1));
        for (i, o) in osds.iter().enumerate() {
            o.maps
                .send(MapView { map: Arc::clone(&map), me: OsdId(i as u32), tuning: tuning() })
                .unwrap();
            o.waker.wake();
        }
        let pool = &map.pools[&PoolId(1)];
        let acting = placement::pg_mapping(&map, pool, placement::PgId { pool: pool.id, pg: 0 }).up;
        let primary = SocketAddr::from(([127, 0, 0, 1], osds[acting[0].0 as usize].port));
        let client = ClientConn::new(primary, 0x77, ops::FEATURES, Limits::DEFAULT);
        Cluster {
            osds,
            map,
            acting,
            client,
            tid: 0,
            replies: Default::default(),
            cookie: 0x77,
            scrubbed: (0, 0),
            tuning: tuning(),
        }
    }

    /// [`Self::start`], then object `a` written ("first") and the PG active+clean.
    /// `DEBUG_LOG=1` shows the OSDs' logs.
    fn start_active() -> Cluster {
        static LOG: std::sync::Once = std::sync::Once::new();
        if std::env::var("DEBUG_LOG").is_ok() {
            LOG.call_once(|| sluice_control::init_logging("info"));
        }
        let mut c = Cluster::start();
        let (st, _) = c.call("a", Op::WriteFull { data: b"first" });
        assert_eq!(st, Status::Ok);
        c.wait_state("active+clean");
        c
    }

    /// The PG reports `osd` sent since the last call (the newest scrub times noted).
    fn reports(&mut self, osd: OsdId) -> Vec<sluice_control::api::PgReport> {
        let mut out = Vec::new();
        while let Ok(r) = self.osd(osd).reports.try_recv() {
            if let Some(p) = r.pgs.into_iter().next() {
                self.scrubbed.0 = self.scrubbed.0.max(p.last_scrub_ms);
                self.scrubbed.1 = self.scrubbed.1.max(p.last_deep_scrub_ms);
                out.push(p);
            }
        }
        out
    }

    fn osd(&mut self, id: OsdId) -> &mut Osd {
        &mut self.osds[id.0 as usize]
    }

    /// Sends a request to the primary (out at once); returns its tid.
    fn send(&mut self, object: &str, op: Op<'_>) -> u64 {
        self.tid += 1;
        let r = Request {
            client: 0x77,
            // (the client id names the client, not the session: it stays)
            tid: self.tid,
            epoch: self.map.epoch,
            flags: 0,
            pool: 1,
            pg: 0,
            object,
            op,
        };
        let mut b = Vec::new();
        r.encode(&mut b);
        self.client.send(ops::MSG_REQUEST, &b).unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            self.pump();
            if self.client.connected() && !self.client.wants_write() {
                return self.tid;
            }
            assert!(Instant::now() < end, "the request never went out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Moves bytes both ways; replies are kept by tid.
    fn pump(&mut self) {
        if !self.client.connected() {
            self.client.connect().unwrap();
        }
        let replies = &mut self.replies;
        let _ = self.client.poll(|e| {
            if let Event::Message { msg_type: ops::MSG_REPLY, frame, .. } = e {
                let r = Reply::decode(session::payload(&frame)).unwrap();
                let body = match r.body {
                    Body::Data(d) => d.to_vec(),
                    _ => Vec::new(),
                };
                replies.insert(r.tid, (r.status, body));
            }
        });
    }

    /// Polls the connection until `tid`'s reply or `until`: (status, body bytes).
    fn reply(&mut self, tid: u64, until: Instant) -> Option<(Status, Vec<u8>)> {
        loop {
            self.pump();
            if let Some(r) = self.replies.remove(&tid) {
                return Some(r);
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn call(&mut self, object: &str, op: Op<'_>) -> (Status, Vec<u8>) {
        let tid = self.send(object, op);
        self.reply(tid, Instant::now() + Duration::from_secs(60)).expect("a reply within 60 s")
    }

    /// Waits until the primary reports the PG in exactly `state`.
    fn wait_state(&mut self, state: &str) {
        let primary = self.acting[0];
        let end = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        loop {
            for p in self.reports(primary) {
                last = p.state.join("+");
            }
            if last == state {
                return;
            }
            assert!(Instant::now() < end, "the PG never became {state} (last {last})");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Every write to the device fails from now on.
fn fail_writes(f: &FaultHandle) {
    f.add_rule(FaultRule::new(OpSet::WRITES, IoError::Media { lba: Lba(0) }));
}

#[test]
fn a_replica_whose_device_fails_does_not_fail_a_write() {
    let mut c = Cluster::start_active();

    // One replica's device fails: the write it cannot take is parked, the PG peers
    // again and leaves that member behind, and the write is answered (two copies).
    let bad = c.acting[2];
    fail_writes(&c.osd(bad).faults);
    let (st, _) = c.call("b", Op::WriteFull { data: b"second" });
    assert_eq!(st, Status::Ok);
    c.wait_state("active+degraded");
    // Later writes go to the member that is left only, and are answered at once.
    for i in 0..20 {
        let (st, _) = c.call(&format!("c{i}"), Op::WriteFull { data: b"third" });
        assert_eq!(st, Status::Ok);
    }
    let (st, data) = c.call("b", Op::Read { offset: 0, len: 0 });
    assert_eq!((st, data.as_slice()), (Status::Ok, &b"second"[..]));
}

#[test]
fn a_write_with_fewer_than_min_size_copies_waits() {
    let mut c = Cluster::start_active();

    // Both replicas fail: one copy only, below min_size 2. The write is never failed;
    // it waits, and the PG says why.
    for i in [1, 2] {
        let id = c.acting[i];
        fail_writes(&c.osd(id).faults);
    }
    let tid = c.send("b", Op::WriteFull { data: b"second" });
    c.wait_state("peered+degraded");
    assert_eq!(
        c.reply(tid, Instant::now() + Duration::from_secs(2)),
        None,
        "answered with one copy"
    );
    // Reads of what is committed are still served.
    let (st, data) = c.call("a", Op::Read { offset: 0, len: 0 });
    assert_eq!((st, data.as_slice()), (Status::Ok, &b"first"[..]));
}

impl Cluster {
    /// Hands every OSD `map` (each as itself).
    fn publish(&mut self, map: OsdMap) {
        self.map = Arc::new(map);
        for (i, o) in self.osds.iter().enumerate() {
            o.maps
                .send(MapView {
                    map: Arc::clone(&self.map),
                    me: OsdId(i as u32),
                    tuning: self.tuning,
                })
                .unwrap();
            o.waker.wake();
        }
    }

    /// The PG's acting set at the current map, and a client connection to its primary.
    fn follow_primary(&mut self) {
        let pool = &self.map.pools[&PoolId(1)];
        let pg = placement::PgId { pool: pool.id, pg: 0 };
        self.acting = placement::pg_mapping(&self.map, pool, pg).up;
        let port = self.osds[self.acting[0].0 as usize].port;
        // A new session (a cookie the server has not seen): request ids stay unique as
        // the tids go on.
        self.cookie += 1;
        self.client = ClientConn::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            self.cookie,
            ops::FEATURES,
            Limits::DEFAULT,
        );
    }
}

#[test]
fn a_member_away_for_600_writes_gets_them_from_the_log_and_can_lead() {
    let mut c = Cluster::start_active();
    let away = c.acting[2];

    // It goes down (epoch 2): the other two take 600 writes (more than one log piece).
    let ports: Vec<u16> = c.osds.iter().map(|o| o.port).collect();
    let mut m = map(&ports, 2);
    m.osds.get_mut(&away).unwrap().up = false;
    c.publish(m);
    c.follow_primary();
    assert!(!c.acting.contains(&away));
    c.wait_state("active+undersized+degraded");
    let data = |i: usize| format!("object {i} written while a member was away").into_bytes();
    for i in 0..600 {
        let (st, _) = c.call(&format!("o{i}"), Op::WriteFull { data: &data(i) });
        assert_eq!(st, Status::Ok, "o{i}");
    }
    let (st, _) = c.call("a", Op::Delete);
    assert_eq!(st, Status::Ok);

    // Back (epoch 3, booted again): recovery pushes 601 objects and 601 entries.
    let mut m = map(&ports, 3);
    m.osds.get_mut(&away).unwrap().up_from = 3;
    c.publish(m.clone());
    c.follow_primary();
    c.wait_state("active+clean");

    // It leads (epoch 4: the others take no primaries) and serves everything.
    c.make_primary(m, 4, away);
    for i in (0..600).step_by(37).chain([599]) {
        let (st, got) = c.call(&format!("o{i}"), Op::Read { offset: 0, len: 0 });
        assert_eq!((st, got), (Status::Ok, data(i)), "o{i} read from the recovered member");
    }
    let (st, _) = c.call("a", Op::Stat);
    assert_eq!(st, Status::NotFound, "the delete it missed was recovered too");
    c.wait_state("active+clean");
}

#[test]
fn a_member_behind_the_log_is_backfilled_alongside_writes() {
    let mut c = Cluster::start_active();
    // 16-entry logs; backfills held to begin with.
    c.tuning = OsdTuning { pg_log_keep: 16, nobackfill: true, ..tuning() };
    let away = c.acting[2];
    let ports: Vec<u16> = c.osds.iter().map(|o| o.port).collect();
    let mut m = map(&ports, 2);
    m.osds.get_mut(&away).unwrap().up = false;
    c.publish(m);
    c.follow_primary();
    c.wait_state("active+undersized+degraded");
    // Deleted first: the entry is trimmed by the time the member is back, so only its
    // own listing names it.
    let (st, _) = c.call("a", Op::Delete);
    assert_eq!(st, Status::Ok);
    let data = |i: usize, round: u32| format!("object {i}, round {round}").into_bytes();
    for i in 0..60 {
        let (st, _) = c.call(&format!("o{i}"), Op::WriteFull { data: &data(i, 1) });
        assert_eq!(st, Status::Ok, "o{i}");
    }

    // Back (booted again), 60 writes behind a 16-entry log: backfilled, not recovered
    // from the log. Held, the PG is active without its copies and takes writes: to
    // objects still to copy (not sent to it), new ones (sent), a delete.
    let mut m = map(&ports, 3);
    m.osds.get_mut(&away).unwrap().up_from = 3;
    c.publish(m.clone());
    c.follow_primary();
    assert!(c.acting.contains(&away));
    c.wait_state("active+backfill_wait+degraded");
    for i in 0..20 {
        let (st, _) = c.call(&format!("o{i}"), Op::WriteFull { data: &data(i, 2) });
        assert_eq!(st, Status::Ok, "o{i} while the backfill waits");
    }
    for i in 60..70 {
        let (st, _) = c.call(&format!("o{i}"), Op::WriteFull { data: &data(i, 2) });
        assert_eq!(st, Status::Ok, "new o{i} while the backfill waits");
    }
    let (st, _) = c.call("o59", Op::Delete);
    assert_eq!(st, Status::Ok);

    // Going on (the same map, backfills allowed), with writes alongside.
    c.tuning.nobackfill = false;
    let mut m3 = m.clone();
    m3.epoch = 4;
    c.publish(m3);
    c.follow_primary();
    let mut tids = Vec::new();
    for i in 20..40 {
        tids.push((i, c.send(&format!("o{i}"), Op::WriteFull { data: &data(i, 3) })));
    }
    for (i, tid) in tids {
        let r = c.reply(tid, Instant::now() + Duration::from_secs(60)).expect("a reply");
        assert_eq!(r.0, Status::Ok, "o{i} during the backfill");
    }
    c.wait_state("active+clean");

    // It leads (the others take no primaries) and has everything, and nothing deleted.
    c.make_primary(m, 5, away);
    for i in 0..70 {
        let want = match i {
            59 => None,
            0..20 | 60..70 => Some(data(i, 2)),
            20..40 => Some(data(i, 3)),
            _ => Some(data(i, 1)),
        };
        let (st, got) = c.call(&format!("o{i}"), Op::Read { offset: 0, len: 0 });
        match want {
            Some(d) => assert_eq!((st, got), (Status::Ok, d), "o{i} on the backfilled member"),
            None => assert_eq!(st, Status::NotFound, "o{i} was deleted during the backfill"),
        }
    }
    let (st, _) = c.call("a", Op::Stat);
    assert_eq!(st, Status::NotFound, "deleted before: gone from the backfilled member");
    c.wait_state("active+clean");
}

impl Cluster {
    /// Publishes `map` at `epoch` with every OSD but `osd` at primary affinity 0, and
    /// follows it: `osd` leads the PG.
    fn make_primary(&mut self, mut map: OsdMap, epoch: u64, osd: OsdId) {
        map.epoch = epoch;
        for (id, o) in map.osds.iter_mut() {
            if *id != osd {
                o.primary_affinity = 0;
            }
        }
        self.publish(map);
        self.follow_primary();
        assert_eq!(self.acting[0], osd);
    }

    /// Hands `map` to some OSDs only (the others keep the map they have).
    fn publish_to(&mut self, map: &OsdMap, to: &[OsdId]) {
        let map = Arc::new(map.clone());
        for id in to {
            let o = &self.osds[id.0 as usize];
            o.maps.send(MapView { map: Arc::clone(&map), me: *id, tuning: self.tuning }).unwrap();
            o.waker.wake();
        }
    }

    /// A client session to `osd` (a new cookie), replacing the current one; returns the
    /// old one.
    fn connect_to(&mut self, osd: OsdId) -> ClientConn {
        self.cookie += 1;
        let port = self.osds[osd.0 as usize].port;
        let c = ClientConn::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            self.cookie,
            ops::FEATURES,
            Limits::DEFAULT,
        );
        std::mem::replace(&mut self.client, c)
    }
}

#[test]
fn a_primary_cut_off_logs_a_write_that_peering_rolls_back() {
    let mut c = Cluster::start_active();
    let (p, q, r) = (c.acting[0], c.acting[1], c.acting[2]);
    let ports: Vec<u16> = c.osds.iter().map(|o| o.port).collect();

    // Epoch 2 reaches the others only: p is down there and q leads (and takes a write).
    let mut m2 = map(&ports, 2);
    m2.osds.get_mut(&p).unwrap().up = false;
    c.publish_to(&m2, &[q, r]);
    let pool = &m2.pools[&PoolId(1)];
    let up2 = placement::pg_mapping(&m2, pool, placement::PgId { pool: pool.id, pg: 0 }).up;
    assert_eq!(up2, [q, r]);
    let to_p = c.connect_to(q);
    c.map = Arc::new(m2);
    let (st, _) = c.call("c", Op::WriteFull { data: b"at q" });
    assert_eq!(st, Status::Ok);

    // p, still at epoch 1, takes a write and logs it; the others refuse it (an older
    // interval), so p parks it and peers: it finds q's newer log, pulls, rolls its own
    // entry back, and tells the client to retry. Never acknowledged.
    let _at_q = std::mem::replace(&mut c.client, to_p);
    c.map = Arc::new(map(&ports, 1));
    let (st, _) = c.call("b", Op::WriteFull { data: b"cut off" });
    assert_eq!(st, Status::Again, "the write p logged alone is rolled back, not acknowledged");

    // Epoch 3 (p booted again) reaches everyone: p leads, the logs agree, and the retry
    // is applied once.
    let mut m3 = map(&ports, 3);
    m3.osds.get_mut(&p).unwrap().up_from = 3;
    c.publish(m3);
    c.follow_primary();
    assert_eq!(c.acting[0], p);
    let (st, _) = c.call("b", Op::Stat);
    assert_eq!(st, Status::NotFound, "rolled back");
    let (st, got) = c.call("c", Op::Read { offset: 0, len: 0 });
    assert_eq!((st, got.as_slice()), (Status::Ok, &b"at q"[..]), "q's write survived");
    let (st, _) = c.call("b", Op::WriteFull { data: b"cut off" });
    assert_eq!(st, Status::Ok);
    c.wait_state("active+clean");
    let (st, got) = c.call("b", Op::Read { offset: 0, len: 0 });
    assert_eq!((st, got.as_slice()), (Status::Ok, &b"cut off"[..]));
}

#[test]
fn a_primary_cut_off_stops_serving_reads_before_the_new_one_takes_a_write() {
    let mut c = Cluster::start_active();
    let (p, q, r) = (c.acting[0], c.acting[1], c.acting[2]);
    let ports: Vec<u16> = c.osds.iter().map(|o| o.port).collect();
    // p leads with a read lease from q and r, and serves reads.
    let (st, got) = c.call("a", Op::Read { offset: 0, len: 0 });
    assert_eq!((st, got.as_slice()), (Status::Ok, &b"first"[..]));

    // Epoch 2 reaches q and r only: p is down there and q leads. p, still at epoch 1,
    // gets no map and no lease any more (q and r peered for a newer interval).
    let mut m2 = map(&ports, 2);
    m2.osds.get_mut(&p).unwrap().up = false;
    c.publish_to(&m2, &[q, r]);
    let to_p = c.connect_to(q);
    let epoch1 = Arc::clone(&c.map);
    c.map = Arc::new(m2.clone());
    // q waits out p's lease (as r reports it) before it goes active and takes this.
    let (st, _) = c.call("a", Op::WriteFull { data: b"second" });
    assert_eq!(st, Status::Ok);

    // A client that still has epoch 1 reads at p: p's lease ran out before q took the
    // write, so p holds the read (laggy) instead of answering with "first".
    let at_q = std::mem::replace(&mut c.client, to_p);
    c.map = epoch1;
    let tid = c.send("a", Op::Read { offset: 0, len: 0 });
    let stale = c.reply(tid, Instant::now() + Duration::from_secs(3));
    assert_eq!(stale, None, "p served a read after q took a write");
    // Once p learns of epoch 2 it answers the held read: it does not lead any more.
    c.publish_to(&m2, &[p]);
    let (st, _) = c.reply(tid, Instant::now() + Duration::from_secs(60)).expect("an answer");
    assert_eq!(st, Status::Redirect);
    c.client = at_q;
    c.map = Arc::new(m2);
    let (st, got) = c.call("a", Op::Read { offset: 0, len: 0 });
    assert_eq!((st, got.as_slice()), (Status::Ok, &b"second"[..]));
}

/// 64 KiB whose every 4 KiB block starts with `tag` (so it can be found on a device).
fn tagged(tag: &[u8; 8]) -> Vec<u8> {
    let mut v: Vec<u8> = (0..64 << 10).map(|i| (i * 7 % 251) as u8).collect();
    for b in v.chunks_mut(4096) {
        b[..8].copy_from_slice(tag);
    }
    v
}

/// Flips a byte in every device block that starts with `tag`; returns how many.
fn corrupt(media: &RamMedia, tag: &[u8; 8]) -> usize {
    let mut n = 0;
    let mut block = vec![0u8; 4096];
    for i in 0..(64u64 << 20) / 4096 {
        media.read(Lba(i), &mut block);
        if &block[..8] == tag {
            block[100] ^= 0xff;
            media.write(Lba(i), &block);
            n += 1;
        }
    }
    n
}

impl Cluster {
    /// Asks the primary for a scrub and waits until one finishes (its report says a
    /// later time than before); returns the PG's state then.
    fn scrub(&mut self, deep: bool, repair: bool) -> String {
        let pg = placement::PgId { pool: PoolId(1), pg: 0 };
        let primary = self.acting[0];
        let stamp = |s: (u64, u64)| if deep { s.1 } else { s.0 };
        self.reports(primary);
        let before = stamp(self.scrubbed);
        let o = self.osd(primary);
        o.commands.send(CoreCmd::Scrub { pg, deep, repair }).unwrap();
        o.waker.wake();
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            for p in self.reports(primary) {
                if stamp((p.last_scrub_ms, p.last_deep_scrub_ms)) > before {
                    return p.state.join("+");
                }
            }
            assert!(Instant::now() < end, "no scrub finished");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn deep_scrub_finds_corrupt_copies_and_repair_replaces_them_from_good_ones() {
    let mut c = Cluster::start_active();
    let (p, r) = (c.acting[0], c.acting[2]);
    let on_replica = tagged(b"REPLICA!");
    let on_primary = tagged(b"PRIMARY!");
    for (name, data) in [("x", &on_replica), ("y", &on_primary)] {
        let (st, _) = c.call(name, Op::WriteFull { data });
        assert_eq!(st, Status::Ok);
    }
    // A plain scrub compares sizes and xattrs only: all agree.
    assert_eq!(c.scrub(false, false), "active+clean");

    // x rots on one replica, y on the primary: a deep scrub reads every copy.
    assert!(corrupt(&c.osd(r).media, b"REPLICA!") > 0);
    assert!(corrupt(&c.osd(p).media, b"PRIMARY!") > 0);
    assert_eq!(c.scrub(true, false), "active+clean+inconsistent");
    // Writes wait during a scrub, never fail; this one after it.
    let (st, _) = c.call("z", Op::WriteFull { data: b"after the scrub" });
    assert_eq!(st, Status::Ok);

    // Repair: x is pushed to the replica, y pulled by the primary from a good copy; the
    // deep scrub that follows finds nothing (the first report after it may show the
    // repair's own scrub, or already the one after).
    c.scrub(true, true);
    c.wait_state("active+clean");
    for (name, data) in [("x", &on_replica), ("y", &on_primary)] {
        let (st, got) = c.call(name, Op::Read { offset: 0, len: 0 });
        assert_eq!((st, &got), (Status::Ok, data), "{name} after the repair");
    }
    assert_eq!(c.scrub(true, false), "active+clean");
}
