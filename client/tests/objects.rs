//! Objects through a real OSD: `sluice dev up` with one monitor and one OSD (pool size 1),
//! the client library and the CLI. States are awaited, never timed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, Raw, core_addr, wait_for};
use sluice_client::{Error, Io, Op, Options, Output};
use sluice_net::frame::Limits;
use sluice_net::ops::{self, Request, Status};
use sluice_net::tcp::ClientConn;

fn cluster() -> (Cluster, sluice_client::Cluster) {
    let c = Cluster::up_with(1, 1, "256M");
    c.ok(&["pool", "create", "p", "--size", "1", "--pg-num", "8"]);
    let opts = Options { op_timeout: Duration::from_secs(60), ..Options::default() };
    let client = sluice_client::Cluster::connect_file(&c.conf(), opts).unwrap();
    // The pool and an up OSD with its ports are in the client's map.
    wait_for(60, "OSD up with ports in the map", || {
        let m = client.map();
        (m.pool_by_name("p").is_some()
            && m.osds
                .values()
                .any(|o| o.up && o.addrs.as_ref().is_some_and(|a| !a.core_ports.is_empty())))
        .then_some(())
    });
    (c, client)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn objects_round_trip_list_and_fail_clearly() {
    let (c, client) = cluster();
    let mut io = client.io();
    for (i, n) in [0usize, 1, 4095, 4096, 4097, (4 << 20) + 1].into_iter().enumerate() {
        let name = format!("size-{n}");
        let data = pattern(n, i as u8);
        io.write_full("p", &name, data.clone()).unwrap();
        assert_eq!(io.read_all("p", &name).unwrap(), data, "{n} bytes");
        assert_eq!(io.stat("p", &name).unwrap().0, n as u64);
    }
    // Partial writes extend with zeroes; reads clip at the end.
    io.write("p", "sparse", 10, b"abc".to_vec()).unwrap();
    assert_eq!(io.read_all("p", "sparse").unwrap(), b"\0\0\0\0\0\0\0\0\0\0abc");
    assert_eq!(io.read("p", "sparse", 11, 100).unwrap(), b"bc");
    // Xattrs.
    io.set_xattr("p", "sparse", "owner", b"me".to_vec()).unwrap();
    assert_eq!(io.get_xattr("p", "sparse", "owner").unwrap(), b"me");
    assert_eq!(io.get_xattr("p", "sparse", "nope"), Err(Error::NotFound));
    // Listing spans every PG.
    let mut names = io.list("p").unwrap();
    names.sort();
    let mut want: Vec<String> =
        [0usize, 1, 4095, 4096, 4097, (4 << 20) + 1].iter().map(|n| format!("size-{n}")).collect();
    want.push("sparse".into());
    want.sort();
    assert_eq!(names, want);
    // Paged listing returns the same names.
    let mut paged = Vec::new();
    let mut cursor = None;
    loop {
        let (page, next) = io.list_page("p", cursor, 2).unwrap();
        assert!(page.len() <= 2);
        paged.extend(page);
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    paged.sort();
    assert_eq!(paged, want);
    // Delete; then not found.
    io.remove("p", "sparse").unwrap();
    assert_eq!(io.stat("p", "sparse"), Err(Error::NotFound));
    assert_eq!(io.remove("p", "sparse"), Err(Error::NotFound));
    assert_eq!(io.read("p", "never-written", 0, 10), Err(Error::NotFound));
    // Clear errors for what cannot work.
    assert!(matches!(io.stat("nopool", "x"), Err(Error::NoSuchPool(_))));
    assert!(matches!(
        io.write_full("p", "huge", vec![0; ops::MAX_WRITE_BYTES + 1]),
        Err(Error::TooLarge(_))
    ));
    assert!(matches!(io.stat("p", ""), Err(Error::Invalid(_))));
    drop(c);
}

#[test]
fn cli_object_commands() {
    let (c, _client) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("in");
    std::fs::write(&f, pattern(10_000, 3)).unwrap();
    c.ok(&["put", "p", "o1", f.to_str().unwrap()]);
    let out = dir.path().join("out");
    c.ok(&["get", "p", "o1", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), pattern(10_000, 3));
    let st = c.json(&["stat", "p", "o1"]);
    assert_eq!(st["size"], 10_000);
    // Standard input and output.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["-c", c.conf().to_str().unwrap(), "put", "p", "o2", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"from stdin").unwrap();
    assert!(child.wait().unwrap().success());
    let got = c.sluice(&["get", "p", "o2", "-"]);
    assert_eq!(got.stdout, b"from stdin");
    let ls = c.ok(&["ls", "p"]);
    let mut names: Vec<&str> = ls.lines().collect();
    names.sort();
    assert_eq!(names, ["o1", "o2"]);
    c.ok(&["rm", "p", "o1"]);
    let st = c.sluice(&["stat", "p", "o1"]);
    assert_eq!(st.status.code(), Some(1), "{}", common::text(&st));
    assert!(String::from_utf8_lossy(&st.stderr).contains("no such object"));
    let np = c.sluice(&["get", "nopool", "o1", "-"]);
    assert_eq!(np.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&np.stderr).contains("no pool"), "{}", common::text(&np));
}

/// Many writes in flight while every connection is cut again and again: each write is
/// acknowledged once, applied once (PG versions have no gaps or repeats), and the data
/// is whole.
#[test]
fn cuts_mid_stream_lose_and_duplicate_nothing() {
    let (_c, client) = cluster();
    let mut io = client.io();
    let mut want = std::collections::HashMap::new();
    let mut versions: std::collections::HashMap<u32, Vec<u64>> = Default::default();
    let map = client.map();
    let pool = map.pool_by_name("p").unwrap().clone();
    let mut tids = std::collections::HashMap::new();
    let mut done = Vec::new();
    for round in 0..20u8 {
        for i in 0..16usize {
            let name = format!("cut-{round}-{i}");
            let data: Arc<[u8]> = pattern(3000 + i * 1000, round).into();
            let tid = io.submit("p", &name, Op::WriteFull(data.clone())).unwrap();
            tids.insert(tid, name.clone());
            want.insert(name, data);
        }
        // Let some of them go out, then cut.
        io.poll(Duration::from_millis(1), &mut done);
        io.cut_connections();
    }
    while io.in_flight() > 0 {
        io.poll(Duration::from_secs(1), &mut done);
    }
    assert_eq!(done.len(), tids.len(), "every op completed once");
    for c in &done {
        let name = &tids[&c.tid];
        match &c.result {
            Ok(Output::Written { version }) => {
                let pg = sluice_control::maps::placement::object_pg(&pool, name).pg;
                versions.entry(pg).or_default().push(*version);
            }
            r => panic!("{name}: {r:?}"),
        }
    }
    for (pg, mut v) in versions {
        v.sort();
        let n = v.len() as u64;
        assert_eq!(v, (1..=n).collect::<Vec<_>>(), "PG {pg}: each write applied exactly once");
    }
    for (name, data) in want {
        assert_eq!(io.read_all("p", &name).unwrap(), &data[..], "{name}");
    }
}

/// A resent write (same client and tid) is applied once: in the same OSD process, and
/// after the OSD is killed and restarted (the request id is in the PG log on disk).
#[test]
fn a_resent_write_is_applied_once_even_across_an_osd_restart() {
    let (c, client) = cluster();
    let mut io = client.io();
    let m = client.map();
    let pool = m.pool_by_name("p").unwrap().clone();
    let name = "once";
    let pg = sluice_control::maps::placement::object_pg(&pool, name).pg;
    io.write_full("p", name, b"x".to_vec()).unwrap();
    let mut raw = Raw::new(&client, core_addr(&client, "p", name), 0xfeed);
    let req = |tid, op| Request {
        client: 0xfeed,
        tid,
        epoch: m.epoch,
        flags: 0,
        pool: pool.id.0,
        pg,
        object: name,
        op,
    };
    let (st, v1) = raw.call(&req(1, ops::Op::Delete));
    assert_eq!(st, Status::Ok);
    // The same delete again: applied once, so not "not found", and the same version.
    let resend = Request { flags: ops::flags::RESENT, ..req(1, ops::Op::Delete) };
    assert_eq!(raw.call(&resend), (Status::Ok, v1));
    // A new request id is a new op.
    assert_eq!(raw.call(&req(2, ops::Op::Delete)).0, Status::NotFound);
    let (st, v3) = raw.call(&req(3, ops::Op::WriteFull { data: b"after" }));
    assert_eq!((st, v3), (Status::Ok, v1 + 1), "versions: no gap, nothing applied twice");
    // Restart the OSD (kill -9): the request ids come back from the PG log.
    c.ok(&["dev", "kill", "osd.0"]);
    c.ok(&["dev", "start", "osd.0"]);
    wait_for(120, "a new OSD process up in the map", || {
        let m = client.map();
        (m.epoch > 0 && io.stat("p", name).is_ok_and(|(size, _)| size == 5)).then_some(())
    });
    let mut raw = Raw::new(&client, core_addr(&client, "p", name), 0xfeed);
    let epoch = client.map().epoch;
    let resend = Request { flags: ops::flags::RESENT, epoch, ..req(1, ops::Op::Delete) };
    assert_eq!(raw.call(&resend), (Status::Ok, v1), "deduplicated from the on-disk PG log");
    let again = Request {
        flags: ops::flags::RESENT,
        epoch,
        ..req(3, ops::Op::WriteFull { data: b"after" })
    };
    assert_eq!(raw.call(&again), (Status::Ok, v3));
    assert_eq!(io.read_all("p", name).unwrap(), b"after");
}

/// Garbage, truncated and oversized frames close that connection (the OSD logs why)
/// while it keeps serving everyone else.
#[test]
fn bad_input_closes_only_that_connection() {
    let (c, client) = cluster();
    let mut io = client.io();
    io.write_full("p", "steady", b"ok".to_vec()).unwrap();
    let addr = core_addr(&client, "p", "steady");
    let closes = |bytes: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(bytes).unwrap();
        // The server answers with its banner, then closes: read to the end.
        let mut sink = Vec::new();
        let r = s.read_to_end(&mut sink);
        assert!(
            r.is_ok() || r.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
    };
    closes(&[0xAB; 4096]); // garbage
    // An oversized frame: a valid preamble claiming a segment over the limit.
    let mut big = Vec::new();
    sluice_net::frame::encode(&mut big, 1, 0, &[&[0u8; 16]], &Limits::DEFAULT).unwrap();
    big[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32c::crc32c(&big[..28]);
    big[28..32].copy_from_slice(&crc.to_le_bytes());
    closes(&big);
    // Truncated: half a frame, then the client goes away.
    {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&big[..10]).unwrap();
    }
    // A session whose request is undecodable is dropped.
    let mut raw = ClientConn::new(addr, 0xbad, ops::FEATURES, Limits::DEFAULT);
    raw.set_ticket(client.osd_ticket());
    raw.connect().unwrap();
    raw.send(ops::MSG_REQUEST, b"\x01\x00\x01\x00\xff\xff\xff\xffjunk").unwrap();
    wait_for(60, "the bad session dropped", || match raw.poll(|_| {}) {
        Err(_) => Some(()),
        Ok(()) => {
            std::thread::sleep(Duration::from_millis(5));
            None
        }
    });
    // Everyone else is still served.
    assert_eq!(io.read_all("p", "steady").unwrap(), b"ok");
    io.write_full("p", "steady", b"still".to_vec()).unwrap();
    let log = std::fs::read_to_string(c.path().join("log").join("osd.0.log")).unwrap_or_default();
    assert!(log.contains("closed"), "the OSD logs why it closed connections:\n{log}");
    assert!(
        log.contains("dropping session 0xbad: bad request"),
        "an authenticated session sending an undecodable request is dropped:\n{log}"
    );
}

/// Errors a client can act on, not hangs: an op to a cluster whose only OSD is down
/// times out with a typed error.
#[test]
fn ops_time_out_with_a_typed_error() {
    let (c, _) = cluster();
    let opts = Options { op_timeout: Duration::from_secs(2), ..Options::default() };
    let client = sluice_client::Cluster::connect_file(&c.conf(), opts).unwrap();
    c.ok(&["osd", "set", "noout"]);
    c.ok(&["dev", "stop", "osd.0"]);
    wait_for(60, "osd.0 down in the client's map", || {
        client.map().osds.values().all(|o| !o.up).then_some(())
    });
    let mut io: Io = client.io();
    match io.stat("p", "x") {
        Err(Error::Timeout { op: "stat", .. }) => {}
        r => panic!("{r:?}"),
    }
    // The message says what the op was waiting for.
    let e = io.stat("p", "x").unwrap_err().to_string();
    assert!(e.contains("an up primary for PG"), "{e}");
}
