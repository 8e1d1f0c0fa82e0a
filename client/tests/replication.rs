//! Replication on a real cluster: `sluice dev up` with three OSDs on three hosts, a pool
//! of size 3 and min_size 2, failures made with `sluice dev kill`. Replicas are compared
//! with `sluice-osd dump` once the OSDs are stopped. States are awaited, never timed.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, wait_for};
use sluice_client::{Completion, Io, Op, Options};

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An object's data and xattrs.
type Object = (Vec<u8>, BTreeMap<String, Vec<u8>>);

/// What every object should hold, or nothing (deleted).
#[derive(Default)]
struct Model {
    objects: BTreeMap<String, Option<Object>>,
}

/// Runs `n` ops from `start` with up to `qd` in flight; every one must succeed.
/// Ops: whole writes of 0..200 KiB, partial writes, xattrs and deletes over 60 objects.
fn workload(io: &mut Io, model: &mut Model, start: u64, n: u64, qd: usize) {
    let mut in_flight: BTreeMap<u64, String> = BTreeMap::new();
    let mut out = Vec::new();
    let mut next = start;
    while next < start + n || !in_flight.is_empty() {
        while next < start + n && in_flight.len() < qd {
            let i = next;
            next += 1;
            // One op per object at a time, so the model's order is the OSD's.
            let name = format!("obj-{}", (i * 7) % 60);
            if in_flight.values().any(|o| *o == name) {
                continue;
            }
            let entry = model.objects.entry(name.clone()).or_default();
            let op = match (i % 10, entry.is_some()) {
                (0..=4, _) | (_, false) => {
                    let data = pattern(((i * 7919) % (200 << 10)) as usize, i);
                    *entry = Some((data.clone(), BTreeMap::new()));
                    Op::WriteFull(Arc::from(data))
                }
                (5 | 6, true) => {
                    let (data, _) = entry.as_mut().unwrap();
                    let offset = (i * 331) % (data.len() as u64 + 5000);
                    let piece = pattern(1 + (i as usize * 13) % 9000, i + 1);
                    let end = offset as usize + piece.len();
                    if data.len() < end {
                        data.resize(end, 0);
                    }
                    data[offset as usize..end].copy_from_slice(&piece);
                    Op::Write { offset, data: Arc::from(piece) }
                }
                (7 | 8, true) => {
                    let (_, x) = entry.as_mut().unwrap();
                    let key = format!("k{}", i % 3);
                    let value = pattern(1 + (i as usize) % 100, i + 2);
                    x.insert(key.clone(), value.clone());
                    Op::SetXattr { key, value }
                }
                _ => {
                    *entry = None;
                    Op::Delete
                }
            };
            let tid = io.submit("r", &name, op).unwrap();
            in_flight.insert(tid, name);
        }
        io.poll(Duration::from_millis(100), &mut out);
        for Completion { tid, result } in out.drain(..) {
            let name = in_flight.remove(&tid).expect("a tid we submitted");
            if let Err(e) = result {
                panic!("op {tid} on {name} failed: {e}");
            }
        }
    }
}

/// Reads every object back through the cluster and checks it against the model.
fn verify(io: &mut Io, model: &Model) {
    for (name, want) in &model.objects {
        match want {
            Some((data, xattrs)) => {
                assert_eq!(&io.read_all("r", name).unwrap(), data, "{name}");
                for (k, v) in xattrs {
                    assert_eq!(&io.get_xattr("r", name, k).unwrap(), v, "{name} xattr {k}");
                }
            }
            None => assert_eq!(io.stat("r", name), Err(sluice_client::Error::NotFound), "{name}"),
        }
    }
}

/// The object lines of a dump (no logs), for comparing against the model's count
/// (sluice-bench's own objects, `bench-*`, are not in the model).
fn objects_in(dump: &str) -> usize {
    dump.lines().filter(|l| l.contains(" crc32c ") && !l.contains(" object bench-")).count()
}

/// Waits until every PG of the cluster (8, pool `r`) is in `state`.
fn wait_pgs(c: &Cluster, state: &str) {
    c.wait_pgs(8, state);
}

/// Read leases of 4 s (0.2 x the 20 s heartbeat grace): these tests mark a killed OSD
/// down at once, and its PGs' new primaries wait out its lease.
fn short_leases(c: &Cluster) {
    c.ok(&["config", "set", "osd_read_lease_ratio", "0.2"]);
}

fn cluster() -> (Cluster, sluice_client::Cluster) {
    let c = Cluster::up_with(1, 3, "256M");
    short_leases(&c);
    c.ok(&["pool", "create", "r", "--size", "3", "--min-size", "2", "--pg-num", "8"]);
    let opts = Options { op_timeout: Duration::from_secs(120), ..Options::default() };
    let client = sluice_client::Cluster::connect_file(&c.conf(), opts).unwrap();
    wait_for(60, "three OSDs up with ports and the pool in the map", || {
        let m = client.map();
        (m.pool_by_name("r").is_some()
            && m.osds
                .values()
                .filter(|o| o.up && o.addrs.as_ref().is_some_and(|a| !a.core_ports.is_empty()))
                .count()
                == 3)
            .then_some(())
    });
    (c, client)
}

#[test]
fn writes_reach_every_replica_and_continue_when_one_is_killed() {
    let (c, client) = cluster();
    let mut io = client.io();
    let mut model = Model::default();
    workload(&mut io, &mut model, 0, 600, 16);
    verify(&mut io, &model);
    wait_pgs(&c, "active+clean");
    assert!(c.ok(&["status"]).contains("8 pgs: 8 active+clean"), "{}", c.ok(&["status"]));

    // Periodic scrubs: with 1 s and 2 s intervals every PG is scrubbed and deep-scrubbed
    // without being asked (one PG per core at a time), and finds nothing wrong.
    c.ok(&["config", "set", "osd_scrub_interval", "1"]);
    c.ok(&["config", "set", "osd_deep_scrub_interval", "2"]);
    wait_for(120, "every PG scrubbed and deep-scrubbed on its own", || {
        let rows = c.json(&["pg", "ls", "r"]);
        let rows = rows.as_array().unwrap();
        rows.iter()
            .all(|r| {
                r["last_scrub_ms"].as_u64() > Some(0)
                    && r["last_deep_scrub_ms"].as_u64() > Some(0)
                    && r["scrub_errors"] == 0
            })
            .then_some(())
    });
    c.ok(&["config", "set", "osd_scrub_interval", "0"]);
    c.ok(&["config", "set", "osd_deep_scrub_interval", "0"]);

    // kill -9 one OSD: once the map says it is down, its PGs have 2 of 3 members, which
    // is min_size, and writes go on (ops in flight wait, none fails).
    c.ok(&["dev", "kill", "osd.2"]);
    c.ok(&["osd", "down", "osd.2"]);
    workload(&mut io, &mut model, 600, 600, 16);
    verify(&mut io, &model);
    wait_pgs(&c, "active+undersized+degraded");
    let h = c.json(&["health"]);
    assert!(h.to_string().contains("PG_DEGRADED"), "{h}");

    // A second OSD down leaves 1 of min_size 2: a write waits (and here times out).
    c.ok(&["dev", "kill", "osd.1"]);
    c.ok(&["osd", "down", "osd.1"]);
    let live = model.objects.iter().find(|(_, v)| v.is_some()).unwrap().0.clone();
    let quick = sluice_client::Cluster::connect_file(
        &c.conf(),
        Options { op_timeout: Duration::from_secs(3), ..Options::default() },
    )
    .unwrap();
    let mut short = quick.io();
    let r = short.write_full("r", &live, b"never".to_vec());
    assert!(matches!(r, Err(sluice_client::Error::Timeout { .. })), "{r:?}");
    wait_pgs(&c, "peered+undersized+degraded");
    let q = c.ok(&["pg", "query", "1.0"]);
    assert!(q.contains("state: peered+undersized+degraded") && q.contains("acting: [0]"), "{q}");
    // Reads wait too: with fewer than min_size members the primary holds no read
    // lease (the members away could form a newer interval and take writes).
    let r = short.read_all("r", &live);
    assert!(matches!(r, Err(sluice_client::Error::Timeout { .. })), "{r:?}");

    // The replicas that saw every write are identical, object for object and entry for
    // entry of the PG logs.
    c.ok(&["dev", "down"]);
    let d0 = c.dump(0);
    let d1 = c.dump(1);
    let live = model.objects.values().filter(|v| v.is_some()).count();
    assert_eq!(objects_in(&d0), live, "osd.0 holds every object:\n{d0}");
    assert!(d0 == d1, "osd.0 and osd.1 differ:\n--- osd.0\n{d0}\n--- osd.1\n{d1}");
}

/// One write to every PG of pool `r`: each is answered only once its PG is active with
/// the acting set of the client's map, i.e. once peering and recovery of that interval
/// are done.
fn touch_every_pg(client: &sluice_client::Cluster, io: &mut Io, model: &mut Model) {
    use sluice_control::maps::placement;
    let map = client.map();
    let pool = map.pool_by_name("r").unwrap();
    let mut left: std::collections::BTreeSet<u32> = (0..pool.pg_num).collect();
    let mut i = 0u64;
    while !left.is_empty() {
        let name = format!("touch-{i}");
        i += 1;
        if left.remove(&placement::object_pg(pool, &name).pg) {
            let data = pattern(100, i);
            io.write_full("r", &name, data.clone()).unwrap();
            model.objects.insert(name, Some((data, BTreeMap::new())));
        }
    }
}

#[test]
fn an_osd_killed_under_writes_recovers_from_the_log_after_restart() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (c, client) = cluster();
    let done = AtomicU64::new(0);
    let wait_ops = |n: u64| {
        wait_for(120, "writes to progress", || (done.load(Ordering::Relaxed) >= n).then_some(()))
    };
    // sluice-bench writes through all of it too (4 KiB objects of its own, QD 16); it
    // exits non-zero if any op failed.
    let report = c.path().join("bench.json");
    let bench = std::process::Command::new(common::bin_dir().join("sluice-bench"))
        .args(["objects", "-c"])
        .arg(c.conf())
        .args(["--pool", "r", "--rw", "write", "--size", "4k", "--qd", "16", "--objects", "256"])
        .args(["--runtime", "25s", "--quiet", "--json"])
        .arg(&report)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut model = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut io = client.io();
            let mut model = Model::default();
            for round in 0..30u64 {
                workload(&mut io, &mut model, round * 100, 100, 16);
                done.fetch_add(100, Ordering::Relaxed);
            }
            model
        });
        // kill -9 mid-write; the writes go on with two copies.
        wait_ops(500);
        c.ok(&["dev", "kill", "osd.2"]);
        c.ok(&["osd", "down", "osd.2"]);
        let at_kill = done.load(Ordering::Relaxed);
        // An object larger than one recovery push (4 MiB), written while osd.2 is away.
        let mut big_io = client.io();
        let head = pattern(6 << 20, 77);
        let tail = pattern(4 << 20, 78);
        big_io.write_full("r", "big", head.clone()).unwrap();
        big_io.write("r", "big", 6 << 20, tail.clone()).unwrap();
        wait_ops(at_kill + 800);
        // Back with the same store: peering finds what it missed in the logs.
        c.ok(&["dev", "start", "osd.2"]);
        let mut model = writer.join().unwrap();
        model.objects.insert("big".into(), Some(([head, tail].concat(), BTreeMap::new())));
        model
    });
    wait_for(120, "osd.2 up again in the client's map", || {
        client.map().osds.values().filter(|o| o.up).count().eq(&3).then_some(())
    });
    let out = bench.wait_with_output().unwrap();
    assert!(out.status.success(), "sluice-bench: {}", common::text(&out));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["results"]["errors"], 0, "{r}");
    assert!(r["results"]["ios"].as_u64() > Some(1000), "sluice-bench wrote: {r}");
    let mut io = client.io();
    touch_every_pg(&client, &mut io, &mut model);
    verify(&mut io, &model);
    wait_pgs(&c, "active+clean");
    let ls = c.ok(&["pg", "ls", "r"]);
    assert_eq!(ls.lines().filter(|l| l.contains("active+clean")).count(), 8, "{ls}");

    c.ok(&["dev", "down"]);
    let dumps: Vec<String> = (0..3).map(|i| c.dump(i)).collect();
    let live = model.objects.values().filter(|v| v.is_some()).count();
    assert_eq!(objects_in(&dumps[0]), live, "osd.0 holds every object:\n{}", dumps[0]);
    for i in 1..3 {
        assert!(
            dumps[i] == dumps[0],
            "osd.{i} differs from osd.0:\n--- osd.0\n{}\n--- osd.{i}\n{}",
            dumps[0],
            dumps[i]
        );
    }
    // Every write was applied once: no request id is in a PG log twice (a write resent
    // to a new primary after the kill was answered from the log, not applied again).
    let mut ids = std::collections::HashSet::new();
    for l in dumps[0].lines().filter(|l| l.contains(" log ")) {
        let id: Vec<&str> = l.split_whitespace().skip(4).take(4).collect();
        assert!(ids.insert(id.join(" ")), "applied twice: {l}");
    }
    assert!(ids.len() >= 3000, "{} log entries", ids.len());
}

/// Each OSD's dump split by PG: PG id -> that PG's lines.
fn dump_by_pg(dump: &str) -> BTreeMap<String, String> {
    let mut by: BTreeMap<String, String> = BTreeMap::new();
    for l in dump.lines() {
        let pg = l.split_whitespace().nth(1).unwrap_or("").to_string();
        let e = by.entry(pg).or_default();
        e.push_str(l);
        e.push('\n');
    }
    by
}

/// The acting set of every PG of pool `r`, from `sluice pg ls`.
fn acting_sets(c: &Cluster) -> BTreeMap<String, Vec<u64>> {
    let rows = c.json(&["pg", "ls", "r"]);
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let acting = r["acting"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap());
            (r["pgid"].as_str().unwrap().to_string(), acting.collect())
        })
        .collect()
}

/// Adds an OSD to a `sluice dev` cluster the way `dev up` makes one (a device, a daemon
/// entry in dev.json with its own host) and starts it.
fn add_osd(c: &Cluster, n: usize) {
    let dev = c.path().join(format!("osd.{n}.dev"));
    let osd = common::bin_dir().join("sluice-osd");
    let out = std::process::Command::new(&osd)
        .args(["mkfs", "--dev"])
        .arg(&dev)
        .args(["--size", "256M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let path = c.path().join("dev.json");
    let mut st: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let argv = serde_json::json!([
        osd,
        "run",
        "--dev",
        dev,
        "--conf",
        c.conf(),
        "--rack",
        "rack0",
        "--host",
        format!("host{n}"),
        "--cpus",
        "none"
    ]);
    st["daemons"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": format!("osd.{n}"), "argv": argv}));
    std::fs::write(&path, serde_json::to_vec_pretty(&st).unwrap()).unwrap();
    c.ok(&["dev", "start", &format!("osd.{n}")]);
}

/// How many lines of the OSDs' logs contain `what`.
fn osd_log_lines(c: &Cluster, what: &str) -> usize {
    let Ok(rd) = std::fs::read_dir(c.path().join("log")) else { return 0 };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("osd."))
        .map(|e| {
            let t = std::fs::read_to_string(e.path()).unwrap_or_default();
            t.lines().filter(|l| l.contains(what)).count()
        })
        .sum()
}

#[test]
fn an_osd_marked_out_is_backfilled_out_and_in_and_a_new_one_takes_only_its_share() {
    let c = Cluster::up_with(1, 4, "256M");
    short_leases(&c);
    // Short PG logs: a member new to a PG, or back after 16 writes to it, is backfilled
    // (every object copied, those gone deleted), two objects at a time per OSD.
    c.ok(&["config", "set", "osd_pg_log_keep", "16"]);
    c.ok(&["config", "set", "osd_recovery_max_active", "2"]);
    c.ok(&["pool", "create", "r", "--size", "3", "--min-size", "2", "--pg-num", "8"]);
    let opts = Options { op_timeout: Duration::from_secs(120), ..Options::default() };
    let client = sluice_client::Cluster::connect_file(&c.conf(), opts).unwrap();
    wait_for(60, "four OSDs up and the pool in the client's map", || {
        let m = client.map();
        (m.pool_by_name("r").is_some() && m.osds.values().filter(|o| o.up).count() == 4)
            .then_some(())
    });
    let mut io = client.io();
    let mut model = Model::default();
    workload(&mut io, &mut model, 0, 600, 16);
    wait_pgs(&c, "active+clean");

    // Out: its PGs move to the other OSDs, which are backfilled with every object (the
    // logs were trimmed) alongside writes. Held first (osd_nobackfill): the PGs go
    // active without their new members' copies, and writes go on.
    c.ok(&["config", "set", "osd_nobackfill", "true"]);
    c.ok(&["osd", "out", "3"]);
    wait_for(120, "every PG active, some waiting for a backfill", || {
        let rows = c.json(&["pg", "ls", "r"]);
        let states: Vec<String> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["state"].as_str().unwrap().to_string())
            .collect();
        (states.iter().all(|s| s.starts_with("active") && !s.contains("laggy"))
            && states.iter().any(|s| s.contains("backfill_wait+degraded")))
        .then_some(())
    });
    let status = c.ok(&["status"]);
    assert!(status.contains("backfilling)"), "{status}");
    workload(&mut io, &mut model, 600, 300, 16);
    verify(&mut io, &model);
    c.ok(&["config", "set", "osd_nobackfill", "false"]);
    // And now copied while writes go on.
    workload(&mut io, &mut model, 900, 300, 16);
    wait_pgs(&c, "active+clean");
    let without = acting_sets(&c);
    assert!(without.values().all(|a| !a.contains(&3)), "{without:?}");
    wait_for(60, "HEALTH_OK", || (c.json(&["health"])["status"] == "HEALTH_OK").then_some(()));
    let backfills = osd_log_lines(&c, "backfilled");
    assert!(backfills > 0, "no member was backfilled:\n{}", c.logs());
    workload(&mut io, &mut model, 1200, 300, 16);
    verify(&mut io, &model);

    // In again: osd.3 is far behind every log and holds objects deleted since, which
    // its backfill removes (the dumps below compare its copies).
    c.ok(&["osd", "in", "3"]);
    touch_every_pg(&client, &mut io, &mut model);
    wait_pgs(&c, "active+clean");
    let before = acting_sets(&c);
    assert!(before.values().any(|a| a.contains(&3)), "{before:?}");
    assert!(
        osd_log_lines(&c, "osd.3 backfilled") + osd_log_lines(&c, "primary (osd.3)") > 0,
        "osd.3 was not backfilled"
    );
    wait_for(60, "HEALTH_OK", || (c.json(&["health"])["status"] == "HEALTH_OK").then_some(()));
    verify(&mut io, &model);

    // A fifth OSD: PGs move only onto it (rendezvous placement), and it gets them whole.
    add_osd(&c, 4);
    wait_for(120, "osd.4 up in the client's map", || {
        client.map().osds.values().filter(|o| o.up).count().eq(&5).then_some(())
    });
    touch_every_pg(&client, &mut io, &mut model);
    wait_pgs(&c, "active+clean");
    let after = acting_sets(&c);
    for (pg, a) in &after {
        let b = &before[pg];
        let mut gone: Vec<&u64> = b.iter().filter(|o| !a.contains(o)).collect();
        let added: Vec<&u64> = a.iter().filter(|o| !b.contains(o)).collect();
        gone.sort();
        assert!(added.iter().all(|o| **o == 4), "PG {pg}: {b:?} -> {a:?}: only osd.4 gains");
        assert_eq!(gone.len(), added.len(), "PG {pg}: {b:?} -> {a:?}");
    }
    assert!(after.values().any(|a| a.contains(&4)), "osd.4 got no PG: {after:?}");
    verify(&mut io, &model);

    // Every PG's acting members hold the same objects and log.
    c.ok(&["dev", "down"]);
    let dumps: Vec<BTreeMap<String, String>> = (0..5).map(|i| dump_by_pg(&c.dump(i))).collect();
    for (pg, acting) in &after {
        let first = &dumps[acting[0] as usize][pg];
        for o in &acting[1..] {
            let other = dumps[*o as usize].get(pg).map_or("", String::as_str);
            assert!(
                first == other,
                "PG {pg}: osd.{} and osd.{o} differ:\n{first}\n---\n{other}",
                acting[0]
            );
        }
    }
}

/// 64 KiB whose every 4 KiB block starts with `tag` (so it can be found on a device).
fn tagged(tag: &[u8; 8]) -> Vec<u8> {
    let mut v = pattern(64 << 10, 5);
    for b in v.chunks_mut(4096) {
        b[..8].copy_from_slice(tag);
    }
    v
}

/// Flips a byte in every 4 KiB block of the file that starts with `tag`; returns how many.
fn corrupt_file(path: &std::path::Path, tag: &[u8; 8]) -> usize {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut chunk = vec![0u8; 1 << 20];
    let mut n = 0;
    let mut at = 0;
    while at < len {
        let got = f.read_at(&mut chunk, at).unwrap();
        for (i, b) in chunk[..got].chunks(4096).enumerate() {
            if b.len() >= 8 && &b[..8] == tag {
                let off = at + (i * 4096) as u64 + 100;
                let mut byte = [0u8];
                f.read_exact_at(&mut byte, off).unwrap();
                f.write_all_at(&[byte[0] ^ 0xff], off).unwrap();
                n += 1;
            }
        }
        at += got as u64;
    }
    f.sync_all().unwrap();
    n
}

#[test]
fn deep_scrub_finds_a_corrupt_block_on_a_replica_and_repair_fixes_it() {
    use sluice_control::maps::placement;
    let (c, client) = cluster();
    let mut io = client.io();
    let data = tagged(b"ROTTING!");
    io.write_full("r", "rot", data.clone()).unwrap();
    let map = client.map();
    let pool = map.pool_by_name("r").unwrap();
    let pgid = placement::object_pg(pool, "rot");
    let primary = placement::pg_mapping(&map, pool, pgid).primary().unwrap();
    let replica = (0..3).find(|o| *o != primary.0 as u64).unwrap();
    let pgid = pgid.to_string();
    wait_pgs(&c, "active+clean");

    // A block of the object rots on one replica's device while it is stopped. The stop
    // checkpoints the store, so its next start replays no journal: the block reads as
    // corrupt (were it in the journal's newest batch at replay, it would look like a
    // torn tail and be cut off, with every record after it).
    let name = format!("osd.{replica}");
    let clean_stops = osd_log_lines(&c, "checkpoint written for a clean stop");
    c.ok(&["dev", "stop", &name]);
    assert!(
        osd_log_lines(&c, "checkpoint written for a clean stop") > clean_stops,
        "{name} stopped without a checkpoint"
    );
    let dev = c.path().join(format!("osd.{replica}.dev"));
    assert!(corrupt_file(&dev, b"ROTTING!") > 0, "the object's blocks are on {name}");
    c.ok(&["dev", "start", &name]);
    wait_for(120, "the replica up again", || {
        client.map().osds.values().filter(|o| o.up).count().eq(&3).then_some(())
    });
    wait_pgs(&c, "active+clean");
    // Reads come from the primary, whose copy is good.
    assert_eq!(io.read_all("r", "rot").unwrap(), data);

    // A deep scrub reads every copy: the PG is inconsistent, and health says so.
    let query = |c: &Cluster| {
        let t = c.json(&["pg", "ls"]);
        t.as_array().unwrap().iter().find(|r| r["pgid"] == pgid.as_str()).cloned().unwrap()
    };
    let bad = c.sluice(&["pg", "scrub", "1.ff"]);
    assert!(!bad.status.success(), "{}", common::text(&bad));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no PG 1.ff"), "{}", common::text(&bad));
    let out = c.ok(&["pg", "deep-scrub", &pgid]);
    assert!(out.contains("deep scrub of PG"), "{out}");
    let row = wait_for(120, "the deep scrub to find the corrupt copy", || {
        let r = query(&c);
        (r["scrub_errors"].as_u64() > Some(0)).then_some(r)
    });
    assert!(row["state"].as_str().unwrap().contains("inconsistent"), "{row}");
    let h = c.json(&["health"]);
    assert!(h.to_string().contains("PG_DAMAGED"), "{h}");
    assert!(c.ok(&["pg", "query", &pgid]).contains("scrub errors: 1"));

    // Repair copies the primary's good copy over it; its deep scrub then finds nothing.
    let before = row["last_deep_scrub_ms"].as_u64().unwrap();
    c.ok(&["pg", "repair", &pgid]);
    wait_for(120, "the repair and its deep scrub", || {
        let r = query(&c);
        (r["scrub_errors"].as_u64() == Some(0)
            && r["last_deep_scrub_ms"].as_u64() > Some(before)
            && r["state"] == "active+clean")
            .then_some(())
    });
    let h = c.json(&["health"]);
    assert!(!h.to_string().contains("PG_DAMAGED"), "{h}");
    assert_eq!(io.read_all("r", "rot").unwrap(), data);

    c.ok(&["dev", "down"]);
    let dumps: Vec<String> = (0..3).map(|i| c.dump(i)).collect();
    assert!(dumps[0] == dumps[1] && dumps[1] == dumps[2], "replicas differ after the repair");
}
