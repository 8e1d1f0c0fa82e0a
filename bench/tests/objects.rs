//! `sluice-bench objects` against a one-OSD dev cluster: a short run writes the documented
//! report, including the OSD's CPU per I/O. Needs the `sluice`, `sluice-mon` and
//! `sluice-osd` binaries next to `sluice-bench` (`cargo test --workspace` builds them).

use std::path::PathBuf;
use std::process::Command;

fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_sluice-bench")).parent().unwrap().join(name);
    assert!(p.exists(), "{} missing: run `cargo build --bins` first", p.display());
    p
}

struct Dev(PathBuf);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = Command::new(bin("sluice")).args(["dev", "down", "--dir"]).arg(&self.0).output();
    }
}

#[test]
fn objects_run_writes_the_documented_report() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dev = Dev(dir.path().join("c"));
    let up = Command::new(bin("sluice"))
        .args(["dev", "up", "--mons", "1", "--osds", "1", "--device-size", "128M", "--dir"])
        .arg(&dev.0)
        .output()
        .unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let conf = dev.0.join("sluice.conf");
    let pool = Command::new(bin("sluice"))
        .arg("-c")
        .arg(&conf)
        .args(["pool", "create", "b", "--size", "1", "--pg-num", "8"])
        .output()
        .unwrap();
    assert!(pool.status.success(), "{}", String::from_utf8_lossy(&pool.stderr));
    let json = dir.path().join("o.json");
    for rw in ["randread", "mixed"] {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
            .args(["objects", "-c"])
            .arg(&conf)
            .args([
                "--pool",
                "b",
                "--rw",
                rw,
                "--size",
                "4k",
                "--qd",
                "4",
                "--threads",
                "2",
                "--objects",
                "16",
                "--runtime",
                "1s",
                "--quiet",
                "--json",
            ])
            .arg(&json)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(v["kind"], "objects");
        let r = &v["results"];
        assert!(r["ios"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["errors"], 0);
        assert!(r["read"]["p50_us"].as_f64().unwrap() > 0.0);
        assert!(r["osd_cpu_us_per_io"].as_f64().is_some(), "OSD CPU is reported: {r}");
        assert_eq!(v["config"]["threads"], 2);
    }
    // A pool that does not exist is a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["objects", "-c"])
        .arg(&conf)
        .args(["--pool", "nope", "--rw", "write", "--runtime", "1s", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pool"));
}
