//! `sluice dev`: a local cluster on loopback with file-backed devices.
//!
//! Everything lives in one directory: `sluice.conf`, `dev.json` (the daemons and how to
//! start them), `mon.NAME/` stores, `osd.N.dev` device files, `log/NAME.log`,
//! `run/NAME.pid`. Daemons run detached (their own process group), so the CLI can exit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Subcommand;
use serde::{Deserialize, Serialize};
use sluice_control::api;
use sluice_control::client::MonClient;
use sluice_control::conf::{Conf, format_fsid};
use sluice_vocab::ByteSize;

use crate::Fail;

#[derive(Subcommand)]
pub enum DevCmd {
    /// Create and start a local cluster (or start the stopped daemons of an existing one),
    /// wait until it is healthy, write DIR/sluice.conf and print what to do next.
    Up {
        /// Monitors (1, 3 or 5).
        #[arg(long, default_value_t = 3)]
        mons: usize,
        /// OSDs, each on its own device file.
        #[arg(long, default_value_t = 3)]
        osds: usize,
        #[arg(long, default_value = "sluice-dev")]
        dir: PathBuf,
        /// Size of each OSD's device file.
        #[arg(long, default_value = "256M")]
        device_size: ByteSize,
        /// Give up waiting for HEALTH_OK after this many seconds (the cluster keeps
        /// running; `sluice dev status` shows what is wrong).
        #[arg(long, default_value_t = 120)]
        wait: u64,
        /// `cephx` (keys, tickets and caps checked everywhere) or `none` (nothing is
        /// checked: only for experiments; `sluice status` warns). Used when the cluster
        /// is created.
        #[arg(long, default_value = "cephx", value_parser = ["cephx", "none"])]
        auth: String,
        /// The address every daemon listens on and is reached at (one of this machine's:
        /// e.g. a veth end, so an OSD can later be moved into a network namespace).
        /// Used when the cluster is created.
        #[arg(long, default_value = "127.0.0.1")]
        ip: std::net::IpAddr,
    },
    /// Stop every daemon cleanly (OSDs first), killing what does not stop in time.
    Down {
        #[arg(long, default_value = "sluice-dev")]
        dir: PathBuf,
    },
    /// The daemons, whether they run, and the cluster's health.
    Status {
        #[arg(long, default_value = "sluice-dev")]
        dir: PathBuf,
    },
    /// Stop one daemon gracefully (SIGTERM), e.g. osd.1 or mon.b.
    Stop {
        name: String,
        #[arg(long, default_value = "sluice-dev")]
        dir: PathBuf,
    },
    /// Start one stopped daemon again.
    Start {
        name: String,
        #[arg(long, default_value = "sluice-dev")]
        dir: PathBuf,
    },
    /// Kill one daemon with SIGKILL (a crash), e.g. to test failure handling.
    Kill {
        name: String,
        #[arg(long, default_value = "sluice-dev")]
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Daemon {
    name: String,
    argv: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DevState {
    fsid: String,
    daemons: Vec<Daemon>,
}

fn fail(e: impl std::fmt::Display) -> Fail {
    Fail(1, e.to_string())
}

fn bin_dir() -> Result<PathBuf, Fail> {
    if let Some(d) = std::env::var_os("SLUICE_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().map_err(fail)?;
    Ok(exe.parent().expect("exe has a directory").to_path_buf())
}

fn binary(name: &str) -> Result<PathBuf, Fail> {
    let p = bin_dir()?.join(name);
    if !p.exists() {
        return Err(Fail(
            1,
            format!(
                "{} not found: build all binaries first (`cargo build --release --bins`), or set SLUICE_BIN_DIR",
                p.display()
            ),
        ));
    }
    Ok(p)
}

fn load(dir: &Path) -> Result<DevState, Fail> {
    let p = dir.join("dev.json");
    let b = std::fs::read(&p).map_err(|e| {
        Fail(
            1,
            format!(
                "{}: {e} (no dev cluster here; `sluice dev up --dir {}`)",
                p.display(),
                dir.display()
            ),
        )
    })?;
    serde_json::from_slice(&b).map_err(|e| fail(format!("{}: {e}", p.display())))
}

fn pid_of(dir: &Path, name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("run").join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Alive, not a zombie, and still one of ours (pids are reused).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next())?;
    if state == Some('Z') {
        return None;
    }
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmd = String::from_utf8_lossy(&cmd);
    cmd.contains("sluice-").then_some(pid)
}

fn spawn(dir: &Path, d: &Daemon) -> Result<i32, Fail> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(dir.join("log")).map_err(fail)?;
    std::fs::create_dir_all(dir.join("run")).map_err(fail)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log").join(format!("{}.log", d.name)))
        .map_err(fail)?;
    let child = std::process::Command::new(&d.argv[0])
        .args(&d.argv[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(fail)?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("starting {}: {e}", d.name)))?;
    let pid = child.id() as i32;
    std::fs::write(dir.join("run").join(format!("{}.pid", d.name)), pid.to_string())
        .map_err(fail)?;
    Ok(pid)
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// SIGTERM, wait up to `grace`, then SIGKILL. Returns whether it stopped by itself.
async fn stop(dir: &Path, name: &str, grace: Duration) -> bool {
    let Some(pid) = pid_of(dir, name) else { return true };
    signal(pid, nix::sys::signal::Signal::SIGTERM);
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if pid_of(dir, name).is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    false
}

/// `n` distinct free ports on `ip`: each is held until all are picked (a port given
/// back at once can be handed out again by the next bind).
fn free_ports(ip: std::net::IpAddr, n: usize) -> Result<Vec<u16>, Fail> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let l = std::net::TcpListener::bind((ip, 0)).map_err(|e| {
            fail(format!("no port on {ip} ({e}): is it an address of this machine?"))
        })?;
        held.push(l);
    }
    held.iter().map(|l| Ok(l.local_addr().map_err(fail)?.port())).collect()
}

fn random_fsid() -> Result<[u8; 16], Fail> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).map_err(fail)?;
    b[6] = (b[6] & 0x0f) | 0x40; // a version-4 UUID
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b)
}

fn run_tool(argv: &[String]) -> Result<(), Fail> {
    let out = std::process::Command::new(&argv[0]).args(&argv[1..]).output().map_err(fail)?;
    if !out.status.success() {
        return Err(fail(format!(
            "{} failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

async fn client(dir: &Path) -> Result<MonClient, Fail> {
    let conf = Conf::load(&dir.join("sluice.conf")).map_err(|e| Fail(4, e.to_string()))?;
    let mut c = MonClient::from_conf(&conf, 0);
    c.deadline = Duration::from_secs(3);
    c.attempt_timeout = Duration::from_secs(2);
    Ok(c)
}

/// Logs `c` in as client.admin (with authentication on) unless it is already; the
/// monitors may still be starting, so a failure is left for the next call.
async fn ensure_login(c: &MonClient, dir: &Path) {
    let Ok(conf) = Conf::load(&dir.join("sluice.conf")) else { return };
    if conf.auth != sluice_control::conf::Auth::Cephx || c.has_credentials() {
        return;
    }
    if let Ok(creds) = crate::auth_cmd::login(c, None, None, Some(&conf)).await {
        c.set_credentials(Some(creds));
    }
}

/// Waits until the map shows `n` OSDs up (or the deadline).
async fn wait_osds_up(c: &MonClient, dir: &Path, n: usize, end: Instant) -> Result<(), Fail> {
    loop {
        ensure_login(c, dir).await;
        if let Ok(m) = c.get::<api::MapView>("/v1/osdmap").await
            && m.osds.iter().filter(|o| o.up).count() >= n
        {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(fail(format!(
                "timed out waiting for {n} OSDs to boot (the daemons' logs: {}/log)",
                dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_healthy(c: &MonClient, dir: &Path, end: Instant) -> Result<api::Status, Fail> {
    loop {
        ensure_login(c, dir).await;
        let last = match c.get::<api::Status>("/v1/status").await {
            Ok(s) if s.health.status == api::HealthStatus::Ok => return Ok(s),
            Ok(s) => format!(
                "{}: {:?}",
                s.health.status.as_str(),
                s.health.checks.iter().map(|c| &c.summary).collect::<Vec<_>>()
            ),
            Err(e) => e.to_string(),
        };
        if Instant::now() > end {
            return Err(fail(format!(
                "the cluster is running but not healthy yet: {last} (`sluice dev status --dir {0}`; logs in {0}/log)",
                dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn run(cmd: &DevCmd, json: bool) -> Result<(), Fail> {
    match cmd {
        DevCmd::Up { mons, osds, dir, device_size, wait, auth, ip } => {
            let end = Instant::now() + Duration::from_secs(*wait);
            let fresh = !dir.join("dev.json").exists();
            if fresh {
                create(dir, *mons, *osds, *device_size, auth == "cephx", *ip)?;
            }
            let st = load(dir)?;
            let c = client(dir).await?;
            // Monitors first, then OSDs one at a time so ids follow names on first boot.
            let mut n_osd = 0;
            for d in &st.daemons {
                if d.name.starts_with("osd.") {
                    if fresh {
                        wait_osds_up(&c, dir, n_osd, end).await?;
                    }
                    n_osd += 1;
                }
                if pid_of(dir, &d.name).is_none() {
                    spawn(dir, d)?;
                }
            }
            wait_osds_up(&c, dir, n_osd, end).await?;
            let s = wait_healthy(&c, dir, end).await?;
            let dir_abs = std::fs::canonicalize(dir).map_err(fail)?;
            if json {
                crate::print_json(&s);
            } else {
                println!(
                    "cluster {} is up in {}: {} monitors, {} OSDs, {}",
                    st.fsid,
                    dir_abs.display(),
                    s.mon.members.len(),
                    s.osdmap.osds,
                    s.health.status.as_str()
                );
                println!("next:");
                println!("  export SLUICE_CONF={}/sluice.conf", dir_abs.display());
                println!("  sluice status; sluice osd tree; sluice pool create rbd");
                println!(
                    "  sluice dev status --dir {0}; sluice dev kill osd.1 --dir {0}; sluice dev start osd.1 --dir {0}",
                    dir.display()
                );
                println!(
                    "  sluice dev down --dir {}   (stops it; `dev up` starts it again)",
                    dir.display()
                );
            }
            Ok(())
        }
        DevCmd::Down { dir } => {
            let st = load(dir)?;
            let mut forced = Vec::new();
            for d in st.daemons.iter().rev() {
                if !stop(dir, &d.name, Duration::from_secs(15)).await {
                    forced.push(d.name.clone());
                }
            }
            if forced.is_empty() {
                println!("stopped every daemon in {}", dir.display());
            } else {
                println!("stopped; killed after 15 s: {}", forced.join(", "));
            }
            Ok(())
        }
        DevCmd::Status { dir } => {
            let st = load(dir)?;
            let procs: BTreeMap<String, Option<i32>> =
                st.daemons.iter().map(|d| (d.name.clone(), pid_of(dir, &d.name))).collect();
            let health = match client(dir).await {
                Ok(c) => c.get::<api::Health>("/health").await.map_err(|e| e.to_string()),
                Err(e) => Err(e.1),
            };
            if json {
                crate::print_json(&serde_json::json!({
                    "fsid": st.fsid,
                    "daemons": procs,
                    "health": health.as_ref().ok(),
                    "error": health.as_ref().err(),
                }));
            } else {
                println!("cluster {} in {}", st.fsid, dir.display());
                for (n, p) in &procs {
                    match p {
                        Some(pid) => println!("  {n:<8} running (pid {pid})"),
                        None => println!("  {n:<8} stopped"),
                    }
                }
                match health {
                    Ok(h) => {
                        println!("health: {}", h.status.as_str());
                        for c in h.checks {
                            println!("  {}: {}", c.name, c.summary);
                        }
                    }
                    Err(e) => println!("health: unknown ({e})"),
                }
            }
            Ok(())
        }
        DevCmd::Stop { name, dir } | DevCmd::Kill { name, dir } | DevCmd::Start { name, dir } => {
            let st = load(dir)?;
            let Some(d) = st.daemons.iter().find(|d| &d.name == name) else {
                let names: Vec<&str> = st.daemons.iter().map(|d| d.name.as_str()).collect();
                return Err(Fail(2, format!("no daemon {name:?} here ({})", names.join(", "))));
            };
            match cmd {
                DevCmd::Stop { .. } => {
                    if stop(dir, name, Duration::from_secs(15)).await {
                        println!("{name} stopped");
                    } else {
                        println!("{name} did not stop within 15 s: killed");
                    }
                }
                DevCmd::Kill { .. } => match pid_of(dir, name) {
                    Some(pid) => {
                        signal(pid, nix::sys::signal::Signal::SIGKILL);
                        let end = Instant::now() + Duration::from_secs(5);
                        while pid_of(dir, name).is_some() && Instant::now() < end {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        println!("{name} killed (pid {pid})");
                    }
                    None => println!("{name} is not running"),
                },
                _ => match pid_of(dir, name) {
                    Some(pid) => println!("{name} is already running (pid {pid})"),
                    None => {
                        let pid = spawn(dir, d)?;
                        println!("{name} started (pid {pid})");
                    }
                },
            }
            Ok(())
        }
    }
}

fn create(
    dir: &Path,
    mons: usize,
    osds: usize,
    device_size: ByteSize,
    cephx: bool,
    ip: std::net::IpAddr,
) -> Result<(), Fail> {
    if !matches!(mons, 1 | 3 | 5) {
        return Err(Fail(2, format!("--mons {mons}: use 1, 3 or 5")));
    }
    let mon_bin = binary("sluice-mon")?;
    let osd_bin = binary("sluice-osd")?;
    std::fs::create_dir_all(dir).map_err(fail)?;
    let dir = std::fs::canonicalize(dir).map_err(fail)?;
    let fsid = random_fsid()?;
    let names = ["a", "b", "c", "d", "e"];
    let ports = free_ports(ip, mons)?;
    let members: Vec<(String, String)> = names[..mons]
        .iter()
        .zip(ports)
        .map(|(n, port)| (n.to_string(), std::net::SocketAddr::new(ip, port).to_string()))
        .collect();
    let list: Vec<String> = members.iter().map(|(n, a)| format!("{n}={a}")).collect();
    let mut daemons = Vec::new();
    for (n, _) in &members {
        let data = dir.join(format!("mon.{n}"));
        let mut mkfs = vec![
            s(&mon_bin),
            "mkfs".into(),
            "--id".into(),
            n.clone(),
            "--fsid".into(),
            format_fsid(&fsid),
            "--initial-members".into(),
            list.join(","),
            "--data".into(),
            s(&data),
        ];
        if cephx {
            // The first monitor's mkfs creates it; the others get the same keys.
            mkfs.extend(["--keyring".into(), s(&dir.join("keyring"))]);
        }
        run_tool(&mkfs)?;
        daemons.push(Daemon {
            name: format!("mon.{n}"),
            argv: vec![s(&mon_bin), "run".into(), "--data".into(), s(&data)],
        });
    }
    let hosts: Vec<String> = members.iter().map(|(_, a)| format!("\"{a}\"")).collect();
    let auth = if cephx {
        "auth = \"cephx\"\n# client.admin's key (and the monitors'); each OSD keeps its own in \
         osd.N.dev.keyring.\nkeyring = \"keyring\"\n"
    } else {
        "# Nothing is checked: anyone who reaches the daemons may do anything.\nauth = \"none\"\n"
    };
    let conf = format!(
        "# Written by `sluice dev up`.\nfsid = \"{}\"\nmon_hosts = [{}]\n{auth}",
        format_fsid(&fsid),
        hosts.join(", ")
    );
    std::fs::write(dir.join("sluice.conf"), conf).map_err(fail)?;
    for i in 0..osds {
        let dev = dir.join(format!("osd.{i}.dev"));
        run_tool(&[
            s(&osd_bin),
            "mkfs".into(),
            "--dev".into(),
            s(&dev),
            "--size".into(),
            device_size.0.to_string(),
        ])?;
        let mut argv = vec![
            s(&osd_bin),
            "run".into(),
            "--dev".into(),
            s(&dev),
            "--conf".into(),
            s(&dir.join("sluice.conf")),
            "--rack".into(),
            "rack0".into(),
            "--host".into(),
            format!("host{i}"),
            "--public-ip".into(),
            ip.to_string(),
        ];
        // One OSD pins its reactor to the CPU taking the disk's interrupts (`--cpus
        // auto`); several on one machine would all pick that CPU, so they are left to
        // the scheduler.
        if osds > 1 {
            argv.extend(["--cpus".into(), "none".into()]);
        }
        daemons.push(Daemon { name: format!("osd.{i}"), argv });
    }
    let st = DevState { fsid: format_fsid(&fsid), daemons };
    std::fs::write(dir.join("dev.json"), serde_json::to_vec_pretty(&st).expect("serializes"))
        .map_err(fail)?;
    Ok(())
}
