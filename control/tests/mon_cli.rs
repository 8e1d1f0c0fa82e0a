//! `sluice-mon mkfs` and `show` as an operator runs them.

use std::process::Command;

fn mon(args: &[&str]) -> (i32, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_sluice-mon")).args(args).output().expect("run sluice-mon");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const FSID: &str = "8f0c6e6a-51c4-4b0f-9a57-3c8d7f3e2a10";

#[test]
fn mkfs_then_show_and_never_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mon-a");
    let data = data.to_str().unwrap();
    let members = "a=127.0.0.1:3300,b=127.0.0.1:3301,c=127.0.0.1:3302";
    let (code, out, err) =
        mon(&["mkfs", "--id", "a", "--fsid", FSID, "--initial-members", members, "--data", data]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("created monitor a of cluster 8f0c6e6a-51c4-4b0f-9a57-3c8d7f3e2a10"),
        "{out}"
    );
    let (code, out, err) = mon(&["show", "--data", data]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("osdmap epoch 1: 0 osds"), "{out}");
    assert!(out.contains("a=127.0.0.1:3300,b=127.0.0.1:3301,c=127.0.0.1:3302"), "{out}");
    let (code, _, err) =
        mon(&["mkfs", "--id", "a", "--fsid", FSID, "--initial-members", members, "--data", data]);
    assert_eq!(code, 1);
    assert!(
        err.contains("exists already") && err.contains("8f0c6e6a51c44b0f9a573c8d7f3e2a10"),
        "{err}"
    );
}

#[test]
fn mkfs_with_a_keyring_founds_the_key_database() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring");
    let k = keyring.to_str().unwrap();
    let members = "a=127.0.0.1:3300,b=127.0.0.1:3301,c=127.0.0.1:3302";
    let mut shows = Vec::new();
    for id in ["a", "b"] {
        let data = dir.path().join(format!("mon-{id}"));
        let data = data.to_str().unwrap();
        let (code, out, err) = mon(&[
            "mkfs",
            "--id",
            id,
            "--fsid",
            FSID,
            "--initial-members",
            members,
            "--data",
            data,
            "--keyring",
            k,
        ]);
        assert_eq!(code, 0, "{err}");
        // The first creates the keyring, the second reuses it.
        assert_eq!(out.contains("created keyring"), id == "a", "{out}");
        let (code, out, err) = mon(&["show", "--data", data]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("auth: 2 entities"), "{out}");
        assert!(out.contains("client.admin mon 'allow *' osd 'allow *'"), "{out}");
        shows.push(out);
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777, 0o600);
    // A keyring others may read is refused, and no store is made.
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = dir.path().join("mon-c");
    let (code, _, err) = mon(&[
        "mkfs",
        "--id",
        "c",
        "--fsid",
        FSID,
        "--initial-members",
        members,
        "--data",
        data.to_str().unwrap(),
        "--keyring",
        k,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!data.exists());
    // Without a keyring: no keys, said at mkfs and by show.
    let data = dir.path().join("mon-plain");
    let data = data.to_str().unwrap();
    let (code, out, _) =
        mon(&["mkfs", "--id", "a", "--fsid", FSID, "--initial-members", members, "--data", data]);
    assert_eq!(code, 0);
    assert!(out.contains("no --keyring"), "{out}");
    let (_, out, _) = mon(&["show", "--data", data]);
    assert!(out.contains("auth: 0 entities (no keys"), "{out}");
}

#[test]
fn bad_arguments_and_missing_stores_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("m");
    let data = data.to_str().unwrap();
    for (members, id, needle) in [
        ("a=127.0.0.1:3300,b=127.0.0.1:3301", "a", "use 1, 3 or 5"),
        ("a=127.0.0.1:3300", "z", "not one of --initial-members"),
        ("a=nohost", "a", "HOST:PORT"),
        ("a=127.0.0.1:3300,a=127.0.0.1:3301,c=127.0.0.1:3302", "a", "repeats"),
    ] {
        let (code, _, err) = mon(&[
            "mkfs",
            "--id",
            id,
            "--fsid",
            FSID,
            "--initial-members",
            members,
            "--data",
            data,
        ]);
        assert_eq!(code, 1, "{members}");
        assert!(err.contains(needle), "{members}: {err}");
    }
    let (code, _, err) =
        mon(&["mkfs", "--id", "a", "--fsid", "xyz", "--initial-members", "a=h:1", "--data", data]);
    assert_eq!(code, 1);
    assert!(err.contains("not a UUID"), "{err}");
    let (code, _, err) = mon(&["show", "--data", data]);
    assert_eq!(code, 1);
    assert!(err.contains("no monitor store here") && err.contains("sluice-mon mkfs"), "{err}");
}
