//! What the multi-process tests share: a dev cluster in a temporary directory.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_net::frame::Limits;
use sluice_net::ops::{self, Reply, Request, Status};
use sluice_net::session::Event;
use sluice_net::tcp::ClientConn;

pub fn bin_dir() -> PathBuf {
    let sluice = PathBuf::from(env!("CARGO_BIN_EXE_sluice"));
    let dir = sluice.parent().unwrap().to_path_buf();
    assert!(
        dir.join("sluice-osd").exists(),
        "{} missing: run `cargo build --bins` (or `cargo test --workspace`) first",
        dir.join("sluice-osd").display()
    );
    dir
}

/// A dev cluster in a temporary directory, brought down when dropped.
pub struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    pub fn up(mons: usize, osds: usize) -> Cluster {
        Cluster::up_with(mons, osds, "64M")
    }

    pub fn up_with(mons: usize, osds: usize, device_size: &str) -> Cluster {
        Cluster::up_prepared(mons, osds, device_size, |_| {})
    }

    /// [`Self::up_with`] after `prepare` ran on the empty cluster directory (e.g. to put
    /// a bootstrap keyring there, which the monitors' mkfs then uses).
    pub fn up_prepared(
        mons: usize,
        osds: usize,
        device_size: &str,
        prepare: impl FnOnce(&Path),
    ) -> Cluster {
        Cluster::up_full(mons, osds, device_size, prepare, &[])
    }

    /// [`Self::up_prepared`] with more `sluice dev up` arguments (e.g. `--auth none`).
    pub fn up_full(
        mons: usize,
        osds: usize,
        device_size: &str,
        prepare: impl FnOnce(&Path),
        extra: &[&str],
    ) -> Cluster {
        bin_dir();
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path());
        let c = Cluster { dir };
        let (mons, osds) = (mons.to_string(), osds.to_string());
        let mut args = vec![
            "dev",
            "up",
            "--mons",
            &mons,
            "--osds",
            &osds,
            "--device-size",
            device_size,
            "--wait",
            "180",
        ];
        args.extend(extra);
        let out = c.sluice(&args);
        assert!(out.status.success(), "dev up failed: {}\n{}", text(&out), c.logs());
        c
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn conf(&self) -> PathBuf {
        self.path().join("sluice.conf")
    }

    /// Runs `sluice` with this cluster's conf and dir.
    pub fn sluice(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.arg("-c").arg(self.conf());
        cmd.args(args);
        if args.first() == Some(&"dev") {
            cmd.arg("--dir").arg(self.path());
        }
        cmd.env("SLUICE_BIN_DIR", bin_dir());
        cmd.output().expect("run sluice")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.sluice(args);
        assert!(out.status.success(), "sluice {args:?} failed: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// `args` sent to one monitor only.
    pub fn json_at(&self, mon_addr: &str, args: &[&str]) -> Option<Value> {
        let mut a = vec!["-m", mon_addr, "--timeout", "3"];
        a.extend(args);
        a.extend(["--format", "json"]);
        let out = self.sluice(&a);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn mon_addr(&self, name: &str) -> String {
        let m = self.json(&["mon", "stat"]);
        m["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap_or_else(|| panic!("no mon {name}"))["addr"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.path().join("log")) {
            for e in rd.flatten() {
                let t = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(15).collect();
                s += &format!("--- {}\n", e.path().display());
                for l in tail.into_iter().rev() {
                    s += l;
                    s += "\n";
                }
            }
        }
        s
    }

    /// Waits until `n` PGs are in `state`, as `sluice pg stat` says (from the
    /// primaries' reports).
    pub fn wait_pgs(&self, n: u64, state: &str) {
        let mut last = Value::Null;
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let s = self.json(&["pg", "stat"]);
            if s.get(state).and_then(|n| n.as_u64()) == Some(n) {
                return;
            }
            assert!(Instant::now() < end, "PGs never all {state}: {last}");
            last = s;
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn osd(&self, id: u64) -> Value {
        let m = self.json(&["osd", "dump"]);
        m["osds"].as_array().unwrap().iter().find(|o| o["id"] == id).cloned().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.sluice(&["dev", "down"]);
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `f` until it returns Some, or panics after `secs` with `what`.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The address of the OSD core serving object `name` of `pool`.
pub fn core_addr(client: &sluice_client::Cluster, pool: &str, name: &str) -> SocketAddr {
    use sluice_control::maps::placement;
    let m = client.map();
    let pool = m.pool_by_name(pool).unwrap();
    let pg = placement::object_pg(pool, name);
    let osd = placement::pg_mapping(&m, pool, pg).primary().unwrap();
    let a = m.osd(osd).unwrap().addrs.clone().unwrap();
    SocketAddr::new(a.public.ip(), a.core_ports[placement::pg_core(pg, a.core_ports.len())])
}

/// Sends raw requests on a session of our own.
pub struct Raw {
    pub conn: ClientConn,
}

impl Raw {
    /// A session of its own, authenticated with `client`'s ticket.
    pub fn new(client: &sluice_client::Cluster, addr: SocketAddr, cookie: u64) -> Raw {
        Raw::with_ticket(addr, cookie, client.osd_ticket())
    }

    pub fn with_ticket(
        addr: SocketAddr,
        cookie: u64,
        ticket: Option<sluice_auth::kdc::ServiceTicket>,
    ) -> Raw {
        let mut conn = ClientConn::new(addr, cookie, ops::FEATURES, Limits::DEFAULT);
        conn.set_ticket(ticket);
        conn.connect().unwrap();
        Raw { conn }
    }

    pub fn call(&mut self, req: &Request<'_>) -> (Status, u64) {
        let (st, v, _) = self.call_msg(req);
        (st, v)
    }

    /// The reply's status, version and message.
    pub fn call_msg(&mut self, req: &Request<'_>) -> (Status, u64, String) {
        let mut buf = Vec::new();
        req.encode(&mut buf);
        self.conn.send(ops::MSG_REQUEST, &buf).unwrap();
        let mut got = None;
        wait_for(60, "a reply", || {
            if !self.conn.connected() {
                let _ = self.conn.connect();
            }
            let _ = self.conn.poll(|e| {
                if let Event::Message { frame, .. } = e {
                    let p = sluice_net::session::payload(&frame);
                    let r = Reply::decode(p).unwrap();
                    if r.tid == req.tid {
                        got = Some((r.status, r.version, r.message.to_string()));
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(2));
            got.clone()
        })
    }
}

impl Cluster {
    /// `sluice-osd dump` of a stopped OSD's device: its PGs' objects and logs.
    pub fn dump(&self, osd: u64) -> String {
        let dev = self.path().join(format!("osd.{osd}.dev"));
        let out = Command::new(bin_dir().join("sluice-osd"))
            .arg("dump")
            .arg("--dev")
            .arg(&dev)
            .output()
            .expect("run sluice-osd dump");
        assert!(out.status.success(), "dump of osd.{osd} failed: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }
}
