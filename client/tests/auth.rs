//! Authentication at the OSDs (issue 6), multi-process on loopback: `sluice dev up`
//! (auth = "cephx"), keys made with `sluice auth`, the client library and raw sessions.
//! Every refusal is followed by a check that the OSD still serves everyone else.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, Raw, core_addr, text, wait_for};
use sluice_client::{Error, Options};
use sluice_net::ops::{self, Request, Status};

fn client(
    c: &Cluster,
    name: Option<&str>,
    keyring: Option<&std::path::Path>,
) -> sluice_client::Cluster {
    let opts = Options {
        op_timeout: Duration::from_secs(60),
        name: name.map(str::to_string),
        keyring: keyring.map(std::path::Path::to_path_buf),
        ..Options::default()
    };
    sluice_client::Cluster::connect_file(&c.conf(), opts).unwrap()
}

fn up_with_pools(pools: &[&str]) -> (Cluster, sluice_client::Cluster) {
    let c = Cluster::up_with(1, 1, "128M");
    for p in pools {
        c.ok(&["pool", "create", p, "--size", "1", "--pg-num", "4"]);
    }
    let admin = client(&c, None, None);
    wait_for(60, "the pools and an up OSD in the client's map", || {
        let m = admin.map();
        (pools.iter().all(|p| m.pool_by_name(p).is_some())
            && m.osds.values().any(|o| o.up && o.addrs.is_some()))
        .then_some(())
    });
    (c, admin)
}

/// A keyring for `entity` with `caps` (pairs of service and caps), made by the admin.
fn key(c: &Cluster, entity: &str, caps: &[&str]) -> std::path::PathBuf {
    let path = c.path().join(format!("{entity}.keyring"));
    let mut args = vec!["auth", "get-or-create", entity];
    args.extend(caps);
    args.extend(["-o", path.to_str().unwrap()]);
    c.ok(&args);
    path
}

#[test]
fn osds_check_identities_and_caps_on_every_op() {
    let (c, admin) = up_with_pools(&["a", "b"]);
    let mut aio = admin.io();
    aio.write_full("a", "x", b"in a".to_vec()).unwrap();
    aio.write_full("b", "y", b"in b".to_vec()).unwrap();
    let mut still_served = |round: u32| {
        let v = format!("round {round}").into_bytes();
        aio.write_full("a", "steady", v.clone()).unwrap();
        assert_eq!(aio.read_all("a", "steady").unwrap(), v);
    };

    // A read-only client reads, and is told which cap a write needs.
    let ro = key(&c, "client.ro", &["mon", "allow r", "osd", "profile read-only"]);
    let ro = client(&c, Some("client.ro"), Some(&ro));
    let mut io = ro.io();
    assert_eq!(io.read_all("a", "x").unwrap(), b"in a");
    match io.write_full("a", "x", b"no".to_vec()) {
        Err(Error::PermissionDenied(m)) => {
            assert!(m.contains("needs osd 'allow w pool=a'"), "{m}");
            assert!(m.contains("has osd 'profile read-only'"), "{m}");
        }
        other => panic!("read-only write: {other:?}"),
    }
    assert!(matches!(io.remove("a", "x"), Err(Error::PermissionDenied(_))));
    assert_eq!(io.read_all("a", "x").unwrap(), b"in a", "nothing was changed");
    still_served(1);

    // A client restricted to pool a cannot touch pool b: not read, list, write or stat.
    let pa = key(&c, "client.pa", &["mon", "allow r", "osd", "allow rw pool=a"]);
    let pa = client(&c, Some("client.pa"), Some(&pa));
    let mut io = pa.io();
    io.write_full("a", "mine", b"ok".to_vec()).unwrap();
    assert_eq!(io.read_all("a", "mine").unwrap(), b"ok");
    for r in [
        io.read_all("b", "y").map(|_| ()),
        io.stat("b", "y").map(|_| ()),
        io.list("b").map(|_| ()),
        io.write_full("b", "y", b"theirs".to_vec()).map(|_| ()),
        io.remove("b", "y"),
    ] {
        match r {
            Err(Error::PermissionDenied(m)) => {
                assert!(m.contains("pool=b") && m.contains("has osd 'allow rw pool=a'"), "{m}")
            }
            other => panic!("pool a's client on pool b: {other:?}"),
        }
    }
    assert_eq!(aio_read(&admin, "b", "y"), b"in b");
    still_served(2);

    // A wrong key and an unknown entity get no ticket, so never reach an OSD.
    let wrong = c.path().join("wrong.keyring");
    let mut k = sluice_auth::keyring::Keyring::new();
    k.insert(
        "client.ro".parse().unwrap(),
        sluice_auth::keyring::KeyringEntry::new(sluice_auth::Secret::generate()),
    );
    k.insert(
        "client.ghost".parse().unwrap(),
        sluice_auth::keyring::KeyringEntry::new(sluice_auth::Secret::generate()),
    );
    k.save(&wrong).unwrap();
    for who in ["client.ro", "client.ghost"] {
        let opts = Options {
            connect_timeout: Duration::from_secs(20),
            name: Some(who.into()),
            keyring: Some(wrong.clone()),
            ..Options::default()
        };
        match sluice_client::Cluster::connect_file(&c.conf(), opts) {
            Err(Error::Unauthenticated(m)) => assert!(m.contains(who), "{who}: {m}"),
            other => panic!("{who} with a wrong key: {other:?}"),
        }
    }
    still_served(3);

    // A session without a ticket is closed at the handshake; one with a ticket for
    // someone else's session cookie cannot take that session over.
    let addr = core_addr(&admin, "a", "x");
    let mut anon = Raw::with_ticket(addr, 0xa11, None);
    anon.conn.send(ops::MSG_REQUEST, b"anything").unwrap();
    wait_for(30, "the unauthenticated connection closed", || {
        anon.conn.poll(|_| {}).is_err().then_some(()).or_else(|| {
            std::thread::sleep(Duration::from_millis(5));
            None
        })
    });
    still_served(4);

    // The CLI says the same, with exit code 5.
    let ro_kr = c.path().join("client.ro.keyring");
    let f = c.path().join("payload");
    std::fs::write(&f, b"cli").unwrap();
    let out = c.sluice(&[
        "-n",
        "client.ro",
        "--keyring",
        ro_kr.to_str().unwrap(),
        "put",
        "a",
        "z",
        f.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains("permission denied: needs osd 'allow w pool=a'"), "{}", text(&out));
    still_served(5);
    let log = std::fs::read_to_string(c.path().join("log").join("osd.0.log")).unwrap();
    assert!(log.contains("registered as osd.0 by client.admin"), "{log}");
}

fn aio_read(c: &sluice_client::Cluster, pool: &str, name: &str) -> Vec<u8> {
    c.io().read_all(pool, name).unwrap()
}

/// An OSD verifies tickets itself: with every monitor down, clients holding a valid
/// ticket keep working, new sessions included.
#[test]
fn an_osd_accepts_clients_while_every_monitor_is_down() {
    let (c, admin) = up_with_pools(&["a"]);
    let mut io = admin.io();
    io.write_full("a", "before", b"1".to_vec()).unwrap();
    c.ok(&["dev", "kill", "mon.a"]);
    let ping = c.sluice(&["--timeout", "2", "status"]);
    assert!(!ping.status.success(), "the only monitor is down");
    for i in 0..20u32 {
        io.write_full("a", &format!("during-{i}"), i.to_le_bytes().to_vec()).unwrap();
    }
    // A new thread's I/O: new sessions, each authenticated at the OSD alone.
    let mut fresh = admin.io();
    for i in 0..20u32 {
        assert_eq!(fresh.read_all("a", &format!("during-{i}")).unwrap(), i.to_le_bytes());
    }
    let addr = core_addr(&admin, "a", "before");
    let m = admin.map();
    let pool = m.pool_by_name("a").unwrap();
    let pg = sluice_control::maps::placement::object_pg(pool, "before").pg;
    let mut raw = Raw::new(&admin, addr, 0x5e55);
    let req = Request {
        client: 0x5e55,
        tid: 1,
        epoch: m.epoch,
        flags: 0,
        pool: pool.id.0,
        pg,
        object: "before",
        op: ops::Op::Stat,
    };
    assert_eq!(raw.call(&req).0, Status::Ok);
    c.ok(&["dev", "start", "mon.a"]);
}

/// Tickets of a few seconds: the client renews and the OSD refetches the rotating
/// secrets without failing an op, for several lifetimes; a ticket left to expire is
/// refused ("unauthenticated") while the renewing client goes on.
#[test]
fn renewal_and_rotation_never_fail_an_op_and_expired_tickets_are_refused() {
    let (c, _) = up_with_pools(&["a"]);
    c.ok(&["config", "set", "auth_service_ticket_ttl", "3"]);
    // The OSD's agent sees the new lifetime with its next map update (a config change
    // reaches subscribers within their long poll, 10 s) and then refetches often.
    let osd_log = || std::fs::read_to_string(c.path().join("log").join("osd.0.log")).unwrap();
    let fetches = |log: &str| log.matches("OSD secrets up to id").count();
    wait_for(60, "the OSD taking rotated secrets", || (fetches(&osd_log()) >= 2).then_some(()));
    let before = fetches(&osd_log());
    let cl = client(&c, None, None);
    let first = cl.osd_ticket().unwrap();
    assert!(
        first.expires_ms - sluice_auth::wall_ms() < 10_000,
        "a three-second ticket (expires in {} ms)",
        first.expires_ms.saturating_sub(sluice_auth::wall_ms())
    );
    let addr = core_addr(&cl, "a", "k");
    let m = cl.map();
    let pool = m.pool_by_name("a").unwrap().clone();
    let pg = sluice_control::maps::placement::object_pg(&pool, "k").pg;
    let mut stale = Raw::with_ticket(addr, 0x01d, Some(first.clone()));
    let stat = |tid| Request {
        client: 0x01d,
        tid,
        epoch: m.epoch,
        flags: 0,
        pool: pool.id.0,
        pg,
        object: "k",
        op: ops::Op::Stat,
    };
    assert_eq!(stale.call(&stat(1)).0, Status::NotFound, "served while valid");

    let mut io = cl.io();
    let end = Instant::now() + Duration::from_secs(12);
    let mut n = 0u64;
    let mut payload = vec![0u8; 4096];
    while Instant::now() < end {
        payload[..8].copy_from_slice(&n.to_le_bytes());
        io.write_full("a", "k", payload.clone()).unwrap_or_else(|e| panic!("write {n}: {e}"));
        assert_eq!(io.read_all("a", "k").unwrap(), payload, "read {n}");
        let _ = stale.conn.poll(|_| {}); // keeps its connection (and ticket) alive
        n += 1;
    }
    let now = cl.osd_ticket().unwrap();
    assert!(now.expires_ms > first.expires_ms + 6000, "renewed several times");
    assert!(sluice_auth::wall_ms() > first.expires_ms);
    let (st, _, msg) = stale.call_msg(&stat(2));
    assert_eq!(st, Status::Unauthenticated, "{msg}");
    assert!(msg.contains("expired"), "{msg}");
    assert_eq!(io.read_all("a", "k").unwrap(), payload, "the renewing client is still served");
    // A cap change applies at the next renewal: within half a lifetime here.
    let kr = key(&c, "client.grow", &["mon", "allow r", "osd", "allow r pool=a"]);
    let grow = client(&c, Some("client.grow"), Some(&kr));
    let mut gio = grow.io();
    assert!(matches!(gio.write_full("a", "g", b"1".to_vec()), Err(Error::PermissionDenied(_))));
    c.ok(&["auth", "caps", "client.grow", "mon", "allow r", "osd", "allow rw pool=a"]);
    wait_for(30, "the new caps in client.grow's renewed ticket", || {
        gio.write_full("a", "g", b"1".to_vec()).is_ok().then_some(())
    });
    let log = osd_log();
    let fetched = fetches(&log) - before;
    assert!(fetched >= 3, "the OSD took new secrets as they rotated ({fetched} times):\n{log}");
    eprintln!("{n} writes and reads across renewals; the OSD took new secrets {fetched} times");
}

/// Authentication is off only when asked for: `sluice dev up --auth none` makes monitors
/// without keys and a configuration saying so; objects then need no key, the OSD logs
/// that it serves anyone, and `sluice status` warns.
#[test]
fn auth_none_is_explicit_and_warned_about() {
    let c = Cluster::up_full(1, 1, "64M", |_| {}, &["--auth", "none"]);
    assert!(!c.path().join("keyring").exists(), "no keys were made");
    let out = c.ok(&["status"]);
    assert!(out.contains("auth: WARNING: none"), "{out}");
    c.ok(&["pool", "create", "open", "--size", "1", "--pg-num", "4"]);
    let f = c.path().join("payload");
    std::fs::write(&f, b"anyone").unwrap();
    c.ok(&["put", "open", "o", f.to_str().unwrap()]);
    assert_eq!(c.ok(&["get", "open", "o", "-"]), "anyone");
    let log = std::fs::read_to_string(c.path().join("log").join("osd.0.log")).unwrap();
    assert!(log.contains("serves anyone who can reach it"), "{log}");
}

/// The management API serves only signed requests when the cluster has keys: an
/// unsigned client is told why, a read-only entity may read but not change the maps.
#[test]
fn the_management_api_checks_signatures_and_mon_caps() {
    let c = Cluster::up_with(1, 1, "64M");
    let ro = key(&c, "client.viewer", &["mon", "allow r"]);
    let ro = ro.to_str().unwrap();
    let out = c.ok(&["-n", "client.viewer", "--keyring", ro, "osd", "dump"]);
    assert!(out.contains("osd.0") || out.contains("0"), "{out}");
    let o = c.sluice(&["-n", "client.viewer", "--keyring", ro, "pool", "create", "x"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("needs mon 'allow w'"), "{}", text(&o));
    // A configuration that says auth = "none" sends unsigned requests: refused, with why.
    let off = c.path().join("off.conf");
    let conf =
        std::fs::read_to_string(c.conf()).unwrap().replace("auth = \"cephx\"", "auth = \"none\"");
    std::fs::write(&off, conf).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["-c", off.to_str().unwrap(), "pool", "create", "y"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("needs a signed request"), "{}", text(&o));
    // The admin is served throughout.
    c.ok(&["pool", "create", "z", "--size", "1", "--pg-num", "4"]);
    assert!(c.ok(&["pool", "ls"]).contains('z'));

    // Registering OSDs needs a dedicated cap (mon 'w' is not enough: an OSD key reaches
    // every pool), keys are never handed out, and an OSD speaks only for itself.
    let pm = key(&c, "client.pools", &["mon", "allow rw"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use sluice_auth::keyring::Keyring;
        use sluice_control::client::{ClientError, MonClient};
        let mc = MonClient::new(
            vec![c.mon_addr("a")],
            sluice_control::monclient::Policy::Static,
            Duration::ZERO,
            1,
            None,
        );
        let login = |name: &str, path: &std::path::Path| {
            let who: sluice_auth::EntityName = name.parse().unwrap();
            let k = Keyring::load_key(path, &who).unwrap();
            let mc = mc.clone();
            async move { mc.login(&who, &k, None, &[]).await.unwrap() }
        };
        let new = |creds: &sluice_auth::kdc::Credentials,
                   uuid: [u8; 16],
                   k: &sluice_auth::Secret| {
            sluice_control::api::OsdNewRequest {
                uuid,
                location: sluice_control::maps::Location { rack: "r".into(), host: "h".into() },
                weight: 65536,
                key_sealed: sluice_auth::request::seal_reply(&creds.session_key, b"osd-new-key", k),
            }
        };
        let pools = login("client.pools", &pm).await;
        let k1 = sluice_auth::Secret::generate();
        match mc.osd_new(&pools, &new(&pools, [7; 16], &k1)).await {
            Err(ClientError::PermissionDenied(m)) => assert!(m.contains("bootstrap-osd"), "{m}"),
            other => panic!("mon 'w' registered an OSD: {other:?}"),
        }
        let admin = login("client.admin", &c.path().join("keyring")).await;
        let r1 = mc.osd_new(&admin, &new(&admin, [7; 16], &k1)).await.unwrap();
        let again = mc.osd_new(&admin, &new(&admin, [7; 16], &k1)).await.unwrap();
        assert_eq!(r1.id, again.id, "a retry with the same key is the same registration");
        let k2 = sluice_auth::Secret::generate();
        match mc.osd_new(&admin, &new(&admin, [7; 16], &k2)).await {
            Err(ClientError::Rejected(m)) => assert!(m.contains("has another key"), "{m}"),
            other => panic!("a second key for a registered OSD: {other:?}"),
        }
        // osd.0 (its key from its keyring) cannot speak for another OSD.
        let osd0 = login("osd.0", &c.path().join("osd.0.dev.keyring")).await;
        mc.set_credentials(Some(osd0));
        let b = serde_json::json!({"id": r1.id, "uuid": vec![7u8; 16], "epoch": 1});
        match mc.post::<_, u64>("/v1/osd/beacon", &b).await {
            Err(ClientError::PermissionDenied(m)) => assert!(m.contains("only for itself"), "{m}"),
            other => panic!("osd.0 beaconed for {}: {other:?}", r1.id),
        }
        let f = serde_json::json!({"reporter": r1.id, "target": 0, "failed": true});
        assert!(matches!(
            mc.post::<_, bool>("/v1/osd/failure", &f).await,
            Err(ClientError::PermissionDenied(_))
        ));
    });
}

/// `ms_mode = "secure"` in the configuration: the OSD's connections continue encrypted
/// after the handshake, and objects work the same.
#[test]
fn secure_mode_is_selected_by_the_configuration() {
    let (c, admin) = up_with_pools(&["a"]);
    let mut io = admin.io();
    io.write_full("a", "before", b"crc".to_vec()).unwrap();
    let addr = core_addr(&admin, "a", "before");
    let mut raw = Raw::new(&admin, addr, 0xc0c);
    let m = admin.map();
    let pool = m.pool_by_name("a").unwrap().clone();
    let stat = |name: &'static str, tid, epoch| Request {
        client: 0xc0c,
        tid,
        epoch,
        flags: 0,
        pool: pool.id.0,
        pg: sluice_control::maps::placement::object_pg(&pool, name).pg,
        object: name,
        op: ops::Op::Stat,
    };
    assert_eq!(raw.call(&stat("before", 1, m.epoch)).0, Status::Ok);
    assert!(!raw.conn.is_secure(), "crc mode by default");
    let conf = std::fs::read_to_string(c.conf()).unwrap();
    std::fs::write(c.conf(), format!("{conf}ms_mode = \"secure\"\n")).unwrap();
    let up_from = c.osd(0)["up_from"].as_u64().unwrap();
    c.ok(&["dev", "kill", "osd.0"]);
    c.ok(&["dev", "start", "osd.0"]);
    wait_for(120, "osd.0 up again", || {
        (c.osd(0)["up"] == true && c.osd(0)["up_from"].as_u64().unwrap() > up_from).then_some(())
    });
    // The same client goes on (its sessions reconnect, now sealed).
    io.write_full("a", "after", b"secure".to_vec()).unwrap();
    assert_eq!(io.read_all("a", "before").unwrap(), b"crc");
    assert_eq!(io.read_all("a", "after").unwrap(), b"secure");
    admin.wait_for_epoch(c.osd(0)["up_from"].as_u64().unwrap(), Duration::from_secs(30));
    let addr = core_addr(&admin, "a", "after");
    let mut raw = Raw::new(&admin, addr, 0xc0d);
    let epoch = admin.map().epoch;
    let req = Request { client: 0xc0d, ..stat("after", 1, epoch) };
    assert_eq!(raw.call(&req).0, Status::Ok);
    assert!(raw.conn.is_secure(), "secure mode after the restart");
}
