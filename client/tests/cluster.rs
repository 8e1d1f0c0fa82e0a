//! Multi-process cluster tests on loopback: real `sluice-mon` and `sluice-osd` processes
//! started with `sluice dev up`, failures made with `sluice dev kill|stop|start` and by
//! hand. Every wait is for a state to be reached (with a generous deadline so a loaded
//! machine does not fail them), never an assertion on elapsed time.
//!
//! `sluice-osd` is built by the dataplane package: `cargo test --workspace` (the README's
//! test command) builds it; `cargo test -p sluice-control` alone needs
//! `cargo build --bins` first.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Cluster, bin_dir, text, wait_for};

#[test]
fn monitors_elect_commit_catch_up_and_refuse_what_they_must() {
    let c = Cluster::up(3, 0);
    let leader = c.json(&["mon", "stat"])["leader"].as_str().unwrap().to_string();
    let addrs: Vec<(String, String)> =
        ["a", "b", "c"].iter().map(|n| (n.to_string(), c.mon_addr(n))).collect();
    c.ok(&["pool", "create", "before", "--size", "2"]);

    // kill -9 the leader: a new one is elected and pool creation keeps committing.
    c.ok(&["dev", "kill", &format!("mon.{leader}")]);
    let survivor = addrs.iter().find(|(n, _)| *n != leader).unwrap().1.clone();
    let new_leader = wait_for(60, "a new leader", || {
        let m = c.json_at(&survivor, &["mon", "stat"])?;
        let l = m["leader"].as_str()?.to_string();
        (l != leader).then_some(l)
    });
    assert_ne!(new_leader, leader);
    c.ok(&["pool", "create", "during", "--pg-num", "16"]);
    c.ok(&["config", "set", "some_key", "some_value"]);

    // The restarted monitor catches up.
    c.ok(&["dev", "start", &format!("mon.{leader}")]);
    let old = addrs.iter().find(|(n, _)| *n == leader).unwrap().1.clone();
    wait_for(60, "the restarted monitor to catch up", || {
        let pools = c.json_at(&old, &["pool", "ls"])?;
        let names: Vec<&str> =
            pools.as_array()?.iter().filter_map(|p| p["name"].as_str()).collect();
        (names.contains(&"before") && names.contains(&"during")).then_some(())
    });
    let v = c.json_at(&old, &["config", "get", "some_key"]).unwrap();
    assert_eq!(v["some_key"], "some_value");

    // A wrong fsid is refused (exit code 4), by every monitor.
    let bad = c.path().join("bad.conf");
    let conf = std::fs::read_to_string(c.conf()).unwrap();
    let fsid_line = conf.lines().find(|l| l.starts_with("fsid")).unwrap();
    std::fs::write(
        &bad,
        conf.replace(fsid_line, "fsid = \"00000000-0000-4000-8000-000000000001\""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("-c")
        .arg(&bad)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to cluster"), "{}", text(&out));

    // A lone monitor of three cannot commit, and says so (exit code 3).
    let (lone_name, lone) = addrs[0].clone();
    for (n, _) in &addrs[1..] {
        c.ok(&["dev", "kill", &format!("mon.{n}")]);
    }
    let out = c.sluice(&["-m", &lone, "--timeout", "12", "pool", "create", "lonely"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no quorum"), "{}", text(&out));
    let h = c.json_at(&lone, &["health"]).unwrap();
    assert_ne!(h["status"], "HEALTH_OK", "{h}");

    // A monitor whose store is damaged refuses to start, clearly, and never starts empty.
    c.ok(&["dev", "stop", &format!("mon.{lone_name}")]);
    let data = c.path().join(format!("mon.{lone_name}"));
    let file = data.join("mon.redb");
    std::fs::write(&file, b"").unwrap();
    let out = Command::new(bin_dir().join("sluice-mon"))
        .args(["run", "--open-retries", "1", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mon.redb") && err.contains("left untouched"), "{err}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0, "the damaged store was replaced");
}

#[test]
fn osds_boot_are_marked_down_and_out_and_come_back() {
    let c = Cluster::up(1, 3);
    let tree = c.ok(&["osd", "tree"]);
    for i in 0..3 {
        assert!(tree.contains(&format!("osd.{i}")), "{tree}");
    }
    c.ok(&["config", "set", "osd_heartbeat_grace", "3"]);
    c.ok(&["config", "set", "mon_osd_down_out_interval", "4"]);
    c.ok(&["config", "set", "mon_osd_beacon_grace", "60"]);

    // kill -9: peers report it, the monitor marks it down, then out.
    c.ok(&["dev", "kill", "osd.1"]);
    wait_for(90, "osd.1 down", || (c.osd(1)["up"] == false).then_some(()));
    wait_for(90, "osd.1 out", || (c.osd(1)["in"] == false).then_some(()));
    let h = c.json(&["health"]);
    assert!(h["checks"].as_array().unwrap().iter().all(|x| x["name"] != "MON_NO_QUORUM"));

    // Restarted: up and in again, same id (the uuid is the store's).
    c.ok(&["dev", "start", "osd.1"]);
    wait_for(90, "osd.1 up and in", || {
        let o = c.osd(1);
        (o["up"] == true && o["in"] == true).then_some(())
    });
    assert_eq!(c.json(&["osd", "ls"]).as_array().unwrap().len(), 3, "no new id was assigned");

    // Under noout a dead OSD goes down but stays in, well past the down-out interval.
    c.ok(&["osd", "set", "noout"]);
    c.ok(&["dev", "kill", "osd.2"]);
    wait_for(90, "osd.2 down", || (c.osd(2)["up"] == false).then_some(()));
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(c.osd(2)["in"], true, "noout was ignored");
    c.ok(&["osd", "unset", "noout"]);
    wait_for(90, "osd.2 out once noout is cleared", || (c.osd(2)["in"] == false).then_some(()));

    // An OSD marked down while alive boots again.
    let before = c.osd(0)["up_from"].as_u64().unwrap();
    c.ok(&["osd", "down", "osd.0"]);
    wait_for(90, "osd.0 to boot again", || {
        let o = c.osd(0);
        (o["up"] == true && o["up_from"].as_u64().unwrap() > before).then_some(())
    });

    // A graceful stop marks the OSD down at once (it tells the monitors itself).
    c.ok(&["dev", "stop", "osd.0"]);
    assert_eq!(c.osd(0)["up"], false);
}

#[test]
fn cli_reads_writes_and_exit_codes() {
    let c = Cluster::up(1, 1);
    let st = c.json(&["status"]);
    assert_eq!(st["health"]["status"], "HEALTH_OK", "{st}");
    c.ok(&["pool", "create", "rbd", "--size", "1", "--pg-num", "8"]);
    let out = c.sluice(&["pool", "create", "rbd"]);
    assert_eq!(out.status.code(), Some(1), "an existing pool is a refusal: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    c.ok(&["pool", "set", "rbd", "pg_num", "16"]);
    assert_eq!(c.json(&["pool", "get", "rbd", "pg_num"])["pg_num"], 16);
    // Where an object lives (it need not exist); names are escaped on the way.
    let m = c.json(&["osd", "map", "rbd", "a b/c?&=%"]);
    assert_eq!(m["object"], "a b/c?&=%");
    assert_eq!(m["pool"], "rbd");
    assert!(m["pg"].as_str().unwrap().starts_with(&format!("{}.", m["pool_id"])), "{m}");
    assert_eq!(m["up"], serde_json::json!([0]));
    assert_eq!(m["primary"], 0);
    let out = c.sluice(&["osd", "map", "rbd", "obj"]);
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("object 'obj' -> pg") && line.contains("primary osd.0"), "{line}");
    let out = c.sluice(&["osd", "map", "nope", "obj"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no pool named")
    );
    let out = c.sluice(&["pool", "rm", "rbd"]);
    assert_eq!(out.status.code(), Some(2), "rm needs the confirmation flag");
    c.ok(&["pool", "rm", "rbd", "--yes-i-really-mean-it"]);
    assert!(c.json(&["pool", "ls"]).as_array().unwrap().is_empty());

    c.ok(&["osd", "set-location", "osd.0", "--rack", "r9", "--host", "h9"]);
    c.ok(&["osd", "primary-affinity", "0", "0.5"]);
    let o = c.osd(0);
    assert_eq!((o["rack"].as_str(), o["host"].as_str()), (Some("r9"), Some("h9")));
    assert_eq!(o["primary_affinity"], 0.5);
    c.ok(&["osd", "out", "0"]);
    assert_eq!(c.osd(0)["in"], false);
    c.ok(&["osd", "in", "0"]);
    for f in ["noout", "noup", "nodown", "pause"] {
        c.ok(&["osd", "set", f]);
    }
    let st = c.json(&["status"]);
    assert_eq!(st["health"]["status"], "HEALTH_WARN");
    assert_eq!(st["osdmap"]["flags"].as_array().unwrap().len(), 4);
    for f in ["noout", "noup", "nodown", "pause"] {
        c.ok(&["osd", "unset", f]);
    }
    c.ok(&["config", "set", "mon_client_selection", "roundrobin"]);
    assert!(c.ok(&["config", "dump"]).contains("mon_client_selection = roundrobin"));
    c.ok(&["config", "rm", "mon_client_selection"]);
    let out = c.sluice(&["config", "get", "mon_client_selection"]);
    assert_eq!(out.status.code(), Some(1));
    let out = c.sluice(&["osd", "out", "osd.77"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(c.ok(&["osd", "tree"]).contains("r9"));

    // /metrics and /health over plain HTTP.
    let addr = c.mon_addr("a");
    let m = c.json_at(&addr, &["health"]).unwrap();
    assert_eq!(m["status"], "HEALTH_OK");
    let body = http_get(&addr, "/metrics");
    assert!(body.contains("sluice_osdmap_epoch "), "{body}");
    assert!(body.contains("sluice_health_status 0"), "{body}");

    // Output into a pipe whose reader is gone (`sluice osd tree | head -1`): a quiet end,
    // never a panic.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("-c")
        .arg(c.conf())
        .args(["osd", "tree"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "sluice panicked on a closed pipe: {err}");

    // An unknown daemon name: a usage error naming the ones there are.
    let out = c.sluice(&["dev", "stop", "osd.9"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mon.a"), "{}", text(&out));

    // No monitor at all: exit code 3.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["-m", "127.0.0.1:1", "--timeout", "2", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    // No configuration: exit code 4.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("status")
        .current_dir(c.path().join("log"))
        .env_remove("SLUICE_CONF")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
}

/// Logins against real monitors: `sluice dev up` founds the key database from the
/// keyring its first monitor's mkfs writes; any monitor checks a challenge any other
/// made; wrong keys, unknown entities and the monitors' own key are refused with the
/// reason; renewal keeps the global id; the leader rotates the service secrets every
/// ticket lifetime.
#[test]
fn logins_get_tickets_and_refuse_what_they_must() {
    use sluice_auth::keyring::Keyring;
    use sluice_auth::{EntityName, Secret, Service};
    use sluice_control::client::{ClientError, MonClient};
    use sluice_control::monclient::Policy;

    // The bootstrap keyring, made beforehand with one more entity: a reader.
    let reader = EntityName::client("reader").unwrap();
    let reader_key = Secret::generate();
    let c = Cluster::up_prepared(3, 0, "64M", |dir| {
        let (mut k, _) = sluice_control::auth::bootstrap_keyring(&dir.join("keyring")).unwrap();
        let mut e = sluice_auth::keyring::KeyringEntry::new(reader_key.clone());
        e.caps.insert(Service::Mon, sluice_auth::Caps::parse(Service::Mon, "allow r").unwrap());
        k.insert(reader.clone(), e);
        k.save(&dir.join("keyring")).unwrap();
    });
    let keyring = c.path().join("keyring");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&keyring).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "keyring mode");
    let admin = EntityName::client("admin").unwrap();
    let key = Keyring::load_key(&keyring, &admin).unwrap();
    let (a, b) = (c.mon_addr("a"), c.mon_addr("b"));
    let at = |addr: &str| {
        MonClient::new(vec![addr.to_string()], Policy::Static, Duration::ZERO, 1, None)
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let creds = at(&a).login(&admin, &key, None, &[Service::Osd]).await.unwrap();
        let osd = creds.ticket(Service::Osd).unwrap();
        assert!(osd.expires_ms > osd.renew_after_ms);
        // The challenge from one monitor, the proof to another.
        let ch: sluice_auth::kdc::ServerChallenge = at(&a).get("/v1/auth/challenge").await.unwrap();
        let req = sluice_auth::kdc::request_session_key(&admin, &key, ch, None, &[Service::Osd]);
        let reply: sluice_auth::kdc::SessionKeyReply =
            at(&b).post("/v1/auth/session", &req).await.unwrap();
        sluice_auth::kdc::open_reply(&key, &req, &reply).unwrap();
        // Renewal keeps the global id, with a fresh session key.
        let again = at(&b).login(&admin, &key, Some(creds.auth_ticket.clone()), &[]).await.unwrap();
        assert_eq!(again.global_id, creds.global_id);
        assert_ne!(again.session_key, creds.session_key);
        for (who, secret, why) in [
            (admin.clone(), Secret::generate(), "wrong key for client.admin"),
            (EntityName::client("nobody").unwrap(), key.clone(), "unknown entity client.nobody"),
            (
                EntityName::mon(),
                Keyring::load_key(&keyring, &EntityName::mon()).unwrap(),
                "unknown entity mon.",
            ),
        ] {
            match at(&a).login(&who, &secret, None, &[Service::Osd]).await {
                Err(ClientError::Unauthenticated(m)) => assert!(m.contains(why), "{who}: {m}"),
                other => panic!("{who}: {other:?}"),
            }
        }
        // Any monitor keeps serving others after refusing.
        at(&a).login(&admin, &key, None, &[]).await.unwrap();

        // Rotating secrets go only to signed requests with mon cap x, sealed for the
        // caller; the OSD secrets fetched open the OSD tickets the monitors issue.
        match at(&b).fetch_rotating(&creds, Service::Osd).await {
            Err(ClientError::PermissionDenied(m)) => {
                assert!(m.contains("only the osd daemons"), "{m}")
            }
            other => panic!("an admin got the OSD secrets: {other:?}"),
        }
        let osd0: EntityName = "osd.0".parse().unwrap();
        let caps = std::collections::BTreeMap::from([(Service::Mon, "profile osd".to_string())]);
        let op = sluice_control::auth::AuthOp::Add { entity: osd0.clone(), caps };
        let sluice_control::auth::AuthAnswer::Entity { key: osd_key, .. } =
            at(&a).auth_command(&creds, &op).await.unwrap()
        else {
            panic!("no entity")
        };
        let oc = at(&a).login(&osd0, &osd_key, None, &[]).await.unwrap();
        let secrets = at(&b).fetch_rotating(&oc, Service::Osd).await.unwrap();
        let (t, sk) = sluice_auth::ticket::open_ticket(
            &osd.blob,
            Service::Osd,
            &secrets,
            sluice_auth::wall_ms(),
        )
        .unwrap();
        assert_eq!((t.entity, sk), (admin.clone(), osd.session_key.clone()));
        let rc = at(&a).login(&reader, &reader_key, None, &[]).await.unwrap();
        match at(&a).fetch_rotating(&rc, Service::Osd).await {
            Err(ClientError::PermissionDenied(m)) => {
                assert!(m.contains("client.reader") && m.contains("needs mon 'allow x'"), "{m}")
            }
            other => panic!("a reader got rotating secrets: {other:?}"),
        }
        let unsigned: Result<Vec<u8>, _> =
            at(&a).post("/v1/auth/rotating", &serde_json::json!({"service": "Osd"})).await;
        match unsigned {
            Err(ClientError::Unauthenticated(m)) => {
                assert!(m.contains("needs a signed request"), "{m}")
            }
            other => panic!("unsigned: {other:?}"),
        }
    });
    // `sluice dev up` configures auth = "cephx" (`--auth none` is tested in auth.rs).
    let out = c.sluice(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("auth: cephx, crc mode"),
        "{}",
        text(&out)
    );

    // A two-second lifetime: the leader rotates both services' secrets.
    let metric = |addr: &str, service: &str| -> Option<u64> {
        let m = http_get(addr, "/metrics");
        let needle = format!("sluice_auth_secret_id{{service=\"{service}\"}} ");
        m.lines().find_map(|l| l.strip_prefix(needle.as_str())?.trim().parse().ok())
    };
    assert_eq!(metric(&a, "osd"), Some(1));
    c.ok(&["config", "set", "auth_service_ticket_ttl", "2"]);
    wait_for(60, "two rotations of the osd secret, seen by every monitor", || {
        [&a, &b].iter().all(|m| metric(m, "osd").is_some_and(|id| id >= 3)).then_some(())
    });
    assert!(metric(&a, "mon").is_some_and(|id| id >= 2));
}

/// `sluice auth ...` against three monitors: keys made, kept, refused, sealed for the
/// caller; caps checked (and malformed ones refused before they are stored); a follower
/// forwards changes to the leader with the caller's signature.
#[test]
fn auth_commands_manage_keys_through_signed_requests() {
    use sluice_auth::EntityName;
    let c = Cluster::up(3, 0);
    let code = |o: &std::process::Output| o.status.code();
    let out = c.ok(&["auth", "ls"]);
    assert!(out.contains("client.admin") && out.contains("caps osd = \"allow *\""), "{out}");
    assert!(!out.contains("mon.") && !out.contains("key"), "ls shows no keys and not mon.: {out}");
    // Through a follower: forwarded to the leader.
    let leader = c.json(&["mon", "stat"])["leader"].as_str().unwrap().to_string();
    let follower = ["a", "b", "c"].into_iter().find(|n| *n != leader).unwrap();
    let kr = c.path().join("backup.keyring");
    let kr_s = kr.to_str().unwrap();
    let f = c.mon_addr(follower);
    c.ok(&[
        "-m",
        &f,
        "auth",
        "get-or-create",
        "client.backup",
        "mon",
        "allow r",
        "osd",
        "allow rw pool=backups",
        "-o",
        kr_s,
    ]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&kr).unwrap().permissions().mode() & 0o777, 0o600);
    let key1 = c.ok(&["auth", "print-key", "client.backup"]);
    let again = c.ok(&["auth", "get-or-create", "client.backup", "osd", "allow *"]);
    let key2 = c.ok(&["auth", "print-key", "client.backup"]);
    assert_eq!(key1, key2, "get-or-create keeps the existing key");
    assert!(again.contains("caps osd = \"allow rw pool=backups\""), "and its caps: {again}");
    let o = c.sluice(&["auth", "add", "client.backup"]);
    assert_eq!(code(&o), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists already"), "{}", text(&o));
    // Malformed caps: refused by the CLI (usage) and by the monitors.
    let o = c.sluice(&["auth", "add", "client.bad", "osd", "allow q"]);
    assert_eq!(code(&o), Some(2), "{}", text(&o));
    // The new entity logs in with its keyring, and lacks mon cap '*'.
    let as_backup = |args: &[&str]| {
        let mut a = vec!["--name", "client.backup", "--keyring", kr_s];
        a.extend_from_slice(args);
        c.sluice(&a)
    };
    let o = as_backup(&["auth", "ls"]);
    assert_eq!(code(&o), Some(5), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("client.backup: permission denied: needs mon 'allow *'"),
        "{}",
        text(&o)
    );
    // New caps count at the next login (every CLI run logs in).
    c.ok(&["auth", "caps", "client.backup", "mon", "allow *"]);
    let o = as_backup(&["auth", "ls"]);
    assert!(o.status.success(), "{}", text(&o));
    // Removed: it cannot log in any more. mon. cannot be removed.
    c.ok(&["auth", "rm", "client.backup"]);
    let o = as_backup(&["status"]);
    let o2 = as_backup(&["auth", "ls"]);
    assert_eq!(code(&o), Some(5), "status needs a login too: {}", text(&o));
    assert_eq!(code(&o2), Some(5), "{}", text(&o2));
    assert!(
        String::from_utf8_lossy(&o2.stderr).contains("unknown entity client.backup"),
        "{}",
        text(&o2)
    );
    let o = c.sluice(&["auth", "rm", "mon."]);
    assert_eq!(code(&o), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("monitors' own key"), "{}", text(&o));
    // The monitors check caps themselves: a request a CLI would refuse.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use sluice_control::client::{ClientError, MonClient};
        let admin = sluice_auth::EntityName::client("admin").unwrap();
        let key =
            sluice_auth::keyring::Keyring::load_key(&c.path().join("keyring"), &admin).unwrap();
        let mc = MonClient::new(
            vec![c.mon_addr("a")],
            sluice_control::monclient::Policy::Static,
            Duration::ZERO,
            1,
            None,
        );
        let creds = mc.login(&admin, &key, None, &[]).await.unwrap();
        let caps =
            std::collections::BTreeMap::from([(sluice_auth::Service::Osd, "allow q".to_string())]);
        let op = sluice_control::auth::AuthOp::Add { entity: "client.bad".parse().unwrap(), caps };
        match mc.auth_command(&creds, &op).await {
            Err(ClientError::Rejected(m)) => assert!(m.contains("not a permission"), "{m}"),
            other => panic!("malformed caps stored: {other:?}"),
        }
        // The database decides, not the ticket: a demoted or removed admin loses the
        // key database at once, with its ticket still valid.
        use sluice_control::auth::{AuthAnswer, AuthOp};
        let all =
            std::collections::BTreeMap::from([(sluice_auth::Service::Mon, "allow *".to_string())]);
        let ops: EntityName = "client.ops".parse().unwrap();
        let AuthAnswer::Entity { key: ops_key, .. } =
            mc.auth_command(&creds, &AuthOp::Add { entity: ops.clone(), caps: all }).await.unwrap()
        else {
            panic!("no entity")
        };
        let oc = mc.login(&ops, &ops_key, None, &[]).await.unwrap();
        mc.auth_command(&oc, &AuthOp::Ls).await.unwrap();
        let read =
            std::collections::BTreeMap::from([(sluice_auth::Service::Mon, "allow r".to_string())]);
        mc.auth_command(&creds, &AuthOp::Caps { entity: ops.clone(), caps: read }).await.unwrap();
        assert!(matches!(
            mc.auth_command(&oc, &AuthOp::Ls).await,
            Err(ClientError::PermissionDenied(_))
        ));
        mc.auth_command(&creds, &AuthOp::Rm { entity: ops.clone() }).await.unwrap();
        match mc.auth_command(&oc, &AuthOp::Ls).await {
            Err(ClientError::Unauthenticated(m)) => {
                assert!(m.contains("no longer in the key database"), "{m}")
            }
            other => panic!("a removed entity kept the API: {other:?}"),
        }
    });
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
