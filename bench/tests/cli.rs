//! `sluice-bench` end to end: a short run writes a report with the documented keys; bad
//! options fail with a clear message.

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
}

#[test]
fn device_run_writes_the_documented_report() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dev = dir.path().join("dev");
    let json = dir.path().join("out.json");
    for (rw, extra) in [("randrw", vec![]), ("write", vec!["--flush-every", "4", "--qd", "4"])] {
        let out = bench()
            .args(["device", "--path"])
            .arg(&dev)
            .args([
                "--dev-size",
                "32M",
                "--rw",
                rw,
                "--runtime",
                "300ms",
                "--quiet",
                "--cpu",
                "none",
                "--json",
            ])
            .arg(&json)
            .args(&extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("IOPS") && stdout.contains("p99"), "{stdout}");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(v["schema"], "sluice-bench/1");
        assert_eq!(v["kind"], "device");
        assert_eq!(v["config"]["rw"], rw);
        for key in [
            "iops",
            "bytes_per_sec",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "max_us",
            "cpu_us_per_io",
            "busy_share",
        ] {
            assert!(v["results"][key].is_number(), "results.{key} missing: {v}");
        }
        assert!(v["results"]["ios"].as_u64().unwrap() > 0);
        assert_eq!(v["results"]["errors"], 0);
        if rw == "write" {
            assert!(v["results"]["flush"]["ios"].as_u64().unwrap() > 0, "flushes were issued");
            assert!(v["results"]["durable_write"]["ios"].as_u64().unwrap() > 0);
        } else {
            assert!(v["results"]["read"]["ios"].as_u64().unwrap() > 0);
            assert!(v["results"]["write"]["ios"].as_u64().unwrap() > 0);
        }
        assert!(v["machine"]["cpus"].as_u64().unwrap() >= 1);
    }
}

#[test]
fn bad_options_fail_with_a_message() {
    let out = bench()
        .args(["device", "--path", "/nonexistent-dir/x", "--rw", "read", "--bs", "3k"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bs must be a multiple of 4k"));
    let out = bench().args(["device", "--path", "/tmp/x", "--rw", "sideways"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sideways"));
    let out = bench()
        .args(["device", "--path", "/nonexistent-dir/x", "--rw", "read", "--dev-size", "8M"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent-dir/x"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn device_takes_nvme_devices_and_says_what_is_missing() {
    let out = bench()
        .args(["device", "--dev", "nvme://ffff:ff:1f.7/1", "--rw", "randread", "--runtime", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no PCI device ffff:ff:1f.7"), "{err}");
    let out = bench()
        .args(["device", "--dev", "nvme://ffff:ff:1f.7/1", "--rw", "read", "--sqpoll"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apply to io_uring devices"), "{err}");
    let out = bench().args(["device", "--dev", "nvme://bogus", "--rw", "read"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("expected nvme://DDDD:BB:SS.F/NSID"), "{err}");
}

#[test]
fn net_baseline_measures_round_trips_and_bandwidth() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for (size, qd, bytes) in [("64", "1", 64u64), ("1M", "4", 1 << 20)] {
        let json = dir.path().join(format!("net-{size}.json"));
        let out = bench()
            .args(["net", "--size", size, "--qd", qd, "--runtime", "300ms", "--quiet", "--json"])
            .arg(&json)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(v["kind"], "net");
        assert_eq!(v["config"]["size"], bytes);
        let r = &v["results"];
        let ios = r["ios"].as_u64().unwrap();
        assert!(ios > 0, "{v}");
        assert_eq!(r["errors"], 0);
        assert!(r["p50_us"].as_f64().unwrap() > 0.0);
        // MB/s counts the request payload.
        let bps = r["bytes_per_sec"].as_f64().unwrap();
        let iops = r["iops"].as_f64().unwrap();
        assert!((bps - iops * bytes as f64).abs() <= 1e-6 * bps.max(1.0), "{v}");
    }
    let out = bench().args(["net", "--qd", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--qd must be at least 1"));
}
