//! A network partition on a real cluster: one OSD runs in a network namespace of its
//! own, joined to the others by a veth pair, and is cut off from its peers and the
//! monitors (a blackhole route inside its namespace) while a client that still has the
//! old map keeps reading from it. Read leases must stop it serving reads before the new
//! primary takes a write: a checker that knows which writes were acknowledged when each
//! read was sent never sees an older value.
//!
//! Needs root (network namespaces). Without, it says so and passes, unless
//! `SLUICE_REQUIRE_NETNS=1` (which `.ci/run` sets) makes that a failure.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, wait_for};
use sluice_client::Options;
use sluice_control::maps::placement;
use sluice_net::frame::Limits;
use sluice_net::ops::{self, Body, Op, Reply, Request, Status};
use sluice_net::session::{self, Event};
use sluice_net::tcp::ClientConn;

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).output().is_ok_and(|o| o.status.success())
}

/// The test network: the root namespace holds 10.213.N.1 (monitors and the other OSDs)
/// and 10.213.N.3 (the stale reader) on one end of a veth pair; the namespace holds
/// 10.213.N.2 (the OSD to cut off) on the other.
struct Net {
    ns: String,
    veth: String,
    n: u32,
}

impl Net {
    fn new() -> Option<Net> {
        let n = std::process::id() % 200 + 20;
        let (ns, veth) = (format!("sluice-t{n}"), format!("slt{n}"));
        // What an earlier run left.
        ip(&["netns", "del", &ns]);
        ip(&["link", "del", &veth]);
        if !ip(&["netns", "add", &ns]) {
            return None;
        }
        let net = Net { ns, veth, n };
        let inner = format!("{}i", net.veth);
        let ok = ip(&["link", "add", &net.veth, "type", "veth", "peer", "name", &inner])
            && ip(&["link", "set", &inner, "netns", &net.ns])
            && ip(&["addr", "add", &format!("{}/24", net.cluster()), "dev", &net.veth])
            && ip(&["addr", "add", &format!("{}/24", net.reader()), "dev", &net.veth])
            && ip(&["link", "set", &net.veth, "up"])
            && ip(&["-n", &net.ns, "addr", "add", &format!("{}/24", net.cut_off()), "dev", &inner])
            && ip(&["-n", &net.ns, "link", "set", &inner, "up"])
            && ip(&["-n", &net.ns, "link", "set", "lo", "up"]);
        assert!(ok, "setting up the veth pair into {} failed", net.ns);
        Some(net)
    }

    fn cluster(&self) -> IpAddr {
        format!("10.213.{}.1", self.n).parse().unwrap()
    }

    fn cut_off(&self) -> IpAddr {
        format!("10.213.{}.2", self.n).parse().unwrap()
    }

    fn reader(&self) -> IpAddr {
        format!("10.213.{}.3", self.n).parse().unwrap()
    }

    /// Nothing from the namespace reaches the monitors or the other OSDs (the reader's
    /// address still works).
    fn cut(&self) {
        let to = format!("{}/32", self.cluster());
        assert!(ip(&["-n", &self.ns, "route", "add", "blackhole", &to]), "cut");
    }

    fn heal(&self) {
        let to = format!("{}/32", self.cluster());
        assert!(ip(&["-n", &self.ns, "route", "del", "blackhole", &to]), "heal");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.ns]);
        ip(&["link", "del", &self.veth]);
    }
}

/// Restarts `osd.N` inside the namespace, reached at the namespace's address.
fn move_into(c: &Cluster, net: &Net, osd: u64) {
    let name = format!("osd.{osd}");
    c.ok(&["dev", "stop", &name]);
    let path = c.path().join("dev.json");
    let mut st: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let d = st["daemons"].as_array_mut().unwrap().iter_mut().find(|d| d["name"] == name).unwrap();
    let mut argv: Vec<String> = serde_json::from_value(d["argv"].clone()).unwrap();
    let at = argv.iter().position(|a| a == "--public-ip").unwrap();
    argv[at + 1] = net.cut_off().to_string();
    let mut wrapped: Vec<String> = ["ip", "netns", "exec", &net.ns].map(String::from).to_vec();
    wrapped.extend(argv);
    d["argv"] = serde_json::json!(wrapped);
    std::fs::write(&path, serde_json::to_vec_pretty(&st).unwrap()).unwrap();
    c.ok(&["dev", "start", &name]);
}

fn value(n: u64) -> Vec<u8> {
    let mut v = n.to_le_bytes().to_vec();
    v.resize(4096, n as u8);
    v
}

/// What the stale reader saw.
#[derive(Debug, Default)]
struct Seen {
    /// Reads answered with data.
    served: u64,
    /// Of those, sent after the cut (and before the heal).
    served_after_cut: u64,
    /// The latest send time (after the cut, before the heal) of a read that was served.
    last_served_after_cut: Option<Duration>,
    /// Other answers (redirects once it learns the new map).
    refused: u64,
    /// A read answered with an older value than was acknowledged when it was sent.
    stale: Option<String>,
}

/// Sets the flags when dropped, also by a panic: the threads they stop end, so a failed
/// check fails the test instead of hanging it.
struct StopOnDrop<'a>(&'a [&'a AtomicBool]);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        for f in self.0 {
            f.store(true, Ordering::SeqCst);
        }
    }
}

/// Reads `object` (being written) and `still` (written once: reads of an object with a
/// write in flight wait for it, reads of this one show the lease alone) at `addr` (the
/// cut-off OSD's core), in turn, as a client with map `epoch` would, every 10 ms until
/// `stop`, from the reader's own address. Every read answered with data must hold at
/// least the value acknowledged when it was sent (the first that does not ends it, in
/// [`Seen::stale`]).
#[allow(clippy::too_many_arguments)]
fn stale_reader(
    addr: SocketAddr,
    from: IpAddr,
    ticket: Option<sluice_auth::kdc::ServiceTicket>,
    epoch: u64,
    pg: u32,
    object: &str,
    still: &str,
    acked: &AtomicU64,
    cut_at: &std::sync::Mutex<Option<Instant>>,
    stop: &AtomicBool,
) -> Seen {
    let mut conn = ClientConn::new(addr, 0x5eed, ops::FEATURES, Limits::DEFAULT);
    conn.set_ticket(ticket);
    conn.set_local_ip(Some(from));
    let mut seen = Seen::default();
    // tid -> (the value acknowledged when it was sent, when it was sent after the cut).
    let mut floors: HashMap<u64, (u64, Option<Duration>)> = HashMap::new();
    let mut tid = 0;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            next += Duration::from_millis(10);
            tid += 1;
            let (name, floor) =
                if tid % 2 == 0 { (still, 1) } else { (object, acked.load(Ordering::SeqCst)) };
            let since_cut = cut_at.lock().unwrap().map(|t| t.elapsed());
            floors.insert(tid, (floor, since_cut));
            let r = Request {
                client: 0x5eed,
                tid,
                epoch,
                flags: 0,
                pool: 1,
                pg,
                object: name,
                op: Op::Read { offset: 0, len: 0 },
            };
            let mut b = Vec::new();
            r.encode(&mut b);
            conn.send(ops::MSG_REQUEST, &b).unwrap();
        }
        if !conn.connected() {
            let _ = conn.connect_nonblocking();
        }
        let mut replies = Vec::new();
        let _ = conn.poll(|e| {
            if let Event::Message { msg_type: ops::MSG_REPLY, frame, .. } = e {
                let r = Reply::decode(session::payload(&frame)).unwrap();
                let data = match r.body {
                    Body::Data(d) => Some(d.to_vec()),
                    _ => None,
                };
                replies.push((r.tid, r.status, data));
            }
        });
        for (tid, status, data) in replies {
            let (floor, since_cut) = floors.remove(&tid).expect("a read we sent");
            match (status, data) {
                (Status::Ok, Some(d)) => {
                    let v = u64::from_le_bytes(d[..8].try_into().unwrap());
                    if v < floor {
                        seen.stale = Some(format!(
                            "value {v} served for a read sent when {floor} was acknowledged \
                             ({since_cut:?} after the cut)"
                        ));
                        return seen;
                    }
                    seen.served += 1;
                    if let Some(t) = since_cut {
                        seen.served_after_cut += 1;
                        seen.last_served_after_cut =
                            Some(t.max(seen.last_served_after_cut.unwrap_or_default()));
                    }
                }
                _ => seen.refused += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    seen
}

#[test]
fn an_osd_cut_off_from_its_peers_stops_serving_reads_within_its_lease() {
    let Some(net) = Net::new() else {
        assert!(
            std::env::var("SLUICE_REQUIRE_NETNS").is_err(),
            "SLUICE_REQUIRE_NETNS is set but no network namespace can be made (root needed)"
        );
        eprintln!("SKIPPED: network namespaces need root");
        return;
    };
    let cluster_ip = net.cluster().to_string();
    let c = Cluster::up_full(1, 3, "256M", |_| {}, &["--ip", &cluster_ip]);
    // Peers report a silent OSD after 3 s; its read lease is 0.8 x that.
    c.ok(&["config", "set", "osd_heartbeat_grace", "3"]);
    c.ok(&["config", "set", "mon_osd_beacon_grace", "60"]);
    c.ok(&["pool", "create", "r", "--size", "3", "--min-size", "2", "--pg-num", "8"]);
    move_into(&c, &net, 2);
    let opts = Options { op_timeout: Duration::from_secs(120), ..Options::default() };
    let client = sluice_client::Cluster::connect_file(&c.conf(), opts).unwrap();
    let cut_ip = net.cut_off();
    wait_for(120, "osd.2 up at its namespace's address", || {
        let m = client.map();
        let o = m.osd(sluice_control::maps::OsdId(2))?;
        (o.up && o.addrs.as_ref()?.public.ip() == cut_ip && m.pool_by_name("r").is_some())
            .then_some(())
    });
    c.wait_pgs(8, "active+clean");

    // An object osd.2 leads.
    let map = client.map();
    let pool = map.pool_by_name("r").unwrap();
    let object = (0..)
        .map(|i| format!("x{i}"))
        .find(|name| {
            let pg = placement::object_pg(pool, name);
            placement::pg_mapping(&map, pool, pg).primary() == Some(sluice_control::maps::OsdId(2))
        })
        .unwrap();
    let pg = placement::object_pg(pool, &object).pg;
    let still = (0..)
        .map(|i| format!("y{i}"))
        .find(|name| placement::object_pg(pool, name).pg == pg)
        .unwrap();
    let addr = common::core_addr(&client, "r", &object);
    assert_eq!(addr.ip(), cut_ip);
    let mut io = client.io();
    io.write_full("r", &object, value(1)).unwrap();
    io.write_full("r", &still, value(1)).unwrap();

    let acked = AtomicU64::new(1);
    let writes_after_down = AtomicU64::new(0);
    let cut_at = std::sync::Mutex::new(None);
    let stop_writer = AtomicBool::new(false);
    let stop_reader = AtomicBool::new(false);
    let epoch = map.epoch;
    let ticket = client.osd_ticket();
    let seen = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut io = client.io();
            let mut n = 1;
            while !stop_writer.load(Ordering::Relaxed) {
                n += 1;
                io.write_full("r", &object, value(n)).unwrap();
                acked.store(n, Ordering::SeqCst);
                let m = client.map();
                if !m.osd(sluice_control::maps::OsdId(2)).unwrap().up {
                    writes_after_down.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        });
        let reader = s.spawn(|| {
            stale_reader(
                addr,
                net.reader(),
                ticket,
                epoch,
                pg,
                &object,
                &still,
                &acked,
                &cut_at,
                &stop_reader,
            )
        });
        let flags = [&stop_reader, &stop_writer];
        let _stop = StopOnDrop(&flags);
        // osd.2 serves reads and writes for a while, then is cut off.
        wait_for(60, "writes through osd.2", || {
            (acked.load(Ordering::SeqCst) >= 100).then_some(())
        });
        net.cut();
        *cut_at.lock().unwrap() = Some(Instant::now());
        // Its peers report it, the monitor marks it down, a new primary waits out its
        // lease and takes the writes.
        wait_for(120, "writes through the new primary", || {
            (writes_after_down.load(Ordering::Relaxed) >= 100).then_some(())
        });
        // Reads go on at osd.2 a while longer: none may be served stale.
        std::thread::sleep(Duration::from_secs(3));
        // From the heal on osd.2 may lead again (once it is up at a newer epoch): reads
        // sent then are still checked for staleness, not against the lease.
        *cut_at.lock().unwrap() = None;
        net.heal();
        wait_for(120, "osd.2 up again", || {
            let m = client.map();
            m.osd(sluice_control::maps::OsdId(2)).filter(|o| o.up).map(|_| ())
        });
        std::thread::sleep(Duration::from_secs(1));
        stop_reader.store(true, Ordering::Relaxed);
        let seen = reader.join().unwrap();
        stop_writer.store(true, Ordering::Relaxed);
        let last = writer.join().unwrap();
        (seen, last)
    });
    let (seen, last) = seen;
    eprintln!("stale reader: {seen:?}; {last} writes");
    assert_eq!(seen.stale, None, "a stale read");
    assert!(seen.served > 10, "osd.2 served no reads before the cut: {seen:?}");
    // The lease is 2.4 s (0.8 x 3 s), of which a primary uses 90% from a round it sent
    // before the cut: no read sent later than that was served (3.4 s leaves room for
    // the reader's own clock reading).
    // It went on serving reads within its lease (it had up to 2.16 s of it left), so
    // the lease is what stopped it, not the failed writes.
    let t = seen.last_served_after_cut.expect("no read served after the cut");
    assert!(t < Duration::from_millis(3400), "served a read sent {t:?} after the cut");

    // osd.2 rejoins; nothing acknowledged is lost and the replicas converge.
    c.wait_pgs(8, "active+clean");
    let got = io.read_all("r", &object).unwrap();
    assert_eq!(got, value(last), "the last acknowledged write");
    c.ok(&["dev", "down"]);
    let dumps: Vec<String> = (0..3).map(|i| c.dump(i)).collect();
    assert!(
        dumps[0] == dumps[1] && dumps[1] == dumps[2],
        "replicas differ:\n{}",
        dumps.join("\n---\n")
    );
}
