//! `sluice-osd mkfs | fsck | run` end to end on a device file.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn osd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice-osd"))
}

fn scratch() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = d.path().join("osd.dev");
    (d, p)
}

#[test]
fn mkfs_then_fsck_is_clean_and_mkfs_twice_is_refused() {
    let (_d, dev) = scratch();
    let out =
        osd().args(["mkfs", "--size", "64M", "--shards", "2", "--dev"]).arg(&dev).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 shard(s)"));
    let out = osd().args(["fsck", "--deep", "--dev"]).arg(&dev).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("clean"));
    let out = osd().args(["mkfs", "--size", "64M", "--dev"]).arg(&dev).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already holds a Sluice store") && err.contains("--force"), "{err}");
    let out = osd().args(["mkfs", "--size", "64M", "--force", "--dev"]).arg(&dev).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn fsck_reports_a_damaged_store_with_exit_code_1() {
    let (_d, dev) = scratch();
    assert!(osd().args(["mkfs", "--size", "32M", "--dev"]).arg(&dev).status().unwrap().success());
    // Damage both device superblock copies.
    let mut bytes = std::fs::read(&dev).unwrap();
    let n = bytes.len();
    bytes[30] ^= 0xff;
    bytes[n - 4096 + 30] ^= 0xff;
    std::fs::write(&dev, &bytes).unwrap();
    let out = osd().args(["fsck", "--dev"]).arg(&dev).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("PROBLEM"));
}

#[test]
fn run_opens_every_shard_and_stops_on_sigterm() {
    let (_d, dev) = scratch();
    assert!(
        osd()
            .args(["mkfs", "--size", "64M", "--shards", "2", "--dev"])
            .arg(&dev)
            .status()
            .unwrap()
            .success()
    );
    let mut child = osd()
        .args(["run", "--dev"])
        .arg(&dev)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("open on 2 reactor")) {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("run never reported the store open");
        seen.push(line);
    }
    assert!(
        seen.iter().filter(|l| l.contains("shard") && l.contains("open:")).count() == 2,
        "{seen:?}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let out = osd().args(["fsck", "--deep", "--dev"]).arg(&dev).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn run_on_a_blank_device_refuses_and_writes_nothing() {
    let (_d, dev) = scratch();
    std::fs::write(&dev, vec![0u8; 8 << 20]).unwrap();
    let out = osd().args(["run", "--dev"]).arg(&dev).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Sluice store") && err.contains("sluice-osd mkfs"), "{err}");
    assert!(std::fs::read(&dev).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn argument_mistakes_are_explained() {
    let (_dir, dev) = scratch();
    let out = osd().args(["mkfs", "--dev"]).arg(&dev).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--size is needed to create the device file"), "{err}");
    assert!(!dev.exists(), "nothing was created");
    assert!(
        osd()
            .args(["mkfs", "--size", "32M", "--shards", "2", "--dev"])
            .arg(&dev)
            .status()
            .unwrap()
            .success()
    );
    let out = osd().args(["run", "--cpus", "0", "--dev"]).arg(&dev).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the store has 2 shard(s): give one CPU per shard"), "{err}");
}

#[test]
fn nvme_devices_say_what_is_missing() {
    // No such PCI function anywhere: the preflight says so before touching VFIO.
    for sub in [&["mkfs"][..], &["fsck"], &["run"]] {
        let out = osd().args(sub).args(["--dev", "nvme://ffff:ff:1f.7/1"]).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("nvme://ffff:ff:1f.7/1: no PCI device ffff:ff:1f.7"),
            "{sub:?}: {err}"
        );
    }
    let out = osd().args(["mkfs", "--dev", "nvme://ffff:ff:1f.7/0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("namespace ids start at 1"), "{err}");
    let out =
        osd().args(["mkfs", "--size", "1G", "--dev", "nvme://ffff:ff:1f.7/1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--size applies to device files"), "{err}");
    let out = osd().args(["run", "--buffered", "--dev", "nvme://ffff:ff:1f.7/1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--buffered applies to device files"), "{err}");
}
