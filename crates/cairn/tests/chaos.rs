//! `cairn chaos`: a short run with every fault kind (kill -9, pause, partitions and
//! slow links through the proxies, clock skew, membership changes with the leader
//! killed) passes its own checks, and the verdict on a saved history rejects what
//! it must.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::binary;

/// Runs `cairn` with `args` in `dir` (TMPDIR too), failing the test if it takes
/// longer than `limit`; returns (success, stdout, stderr).
fn cairn_in(dir: &std::path::Path, args: &[&str], limit: Duration) -> (bool, String, String) {
    let out = dir.join("out.txt");
    let err = dir.join("err.txt");
    let mut child = Command::new(binary())
        .args(args)
        .current_dir(dir)
        .env("TMPDIR", dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "cairn {args:?} still running after {limit:?}:\n{}\n{}",
                std::fs::read_to_string(&out).unwrap_or_default(),
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let o = std::fs::read_to_string(&out).unwrap_or_default();
    let e = std::fs::read_to_string(&err).unwrap_or_default();
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_file(&err).unwrap();
    (status.success(), o, e)
}

/// The number after `label` in `text` (e.g. "kill 3").
fn number_after(text: &str, label: &str) -> Option<u64> {
    let at = text.find(label)? + label.len();
    text[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Whether libfaketime is here (the test command installs it), for clock faults.
fn have_libfaketime() -> bool {
    std::env::var_os("CAIRN_LIBFAKETIME").is_some()
        || std::fs::read_dir("/usr/lib")
            .map(|dirs| {
                dirs.filter_map(|d| d.ok())
                    .any(|d| d.path().join("faketime/libfaketime.so.1").exists())
            })
            .unwrap_or(false)
        || std::path::Path::new("/usr/lib/faketime/libfaketime.so.1").exists()
}

/// Whether this test runs as root (a tmpfs can be mounted, for disk faults).
fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Every fault kind in 50 s, with the keys under `e/` in an erasure-coded
/// (EC:3+2) bucket and the others replicated.
#[test]
fn a_short_run_with_every_fault_kind_passes_and_checks_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut kinds = vec!["kill", "pause", "partition", "slow", "member", "corrupt"];
    if have_libfaketime() {
        kinds.push("clock");
    } else {
        eprintln!("libfaketime is not installed: this run has no clock faults");
    }
    if is_root() {
        kinds.push("disk");
    } else {
        eprintln!("not root (no tmpfs to mount): this run has no disk faults");
    }
    let faults = kinds.join(",");
    let (ok, out, err) = cairn_in(
        dir.path(),
        &[
            "chaos",
            "--faults",
            &faults,
            "--duration",
            "50s",
            "--fault-interval",
            "3s",
            "--fault-length",
            "2s",
            "--min-acked",
            "300",
            "--seed",
            "7",
            "--keys",
            "12",
            "--history",
            "h.jsonl",
        ],
        Duration::from_secs(600),
    );
    if !ok {
        // The cluster's directory (the nodes' logs) is kept for a look.
        let kept = dir.keep();
        panic!("the run failed (kept in {}):\n{out}\n{err}", kept.display());
    }
    assert!(out.contains("PASSED"), "{out}");
    assert!(
        out.contains("0 lost writes, 0 linearizability violations, 0 damaged reads"),
        "{out}"
    );
    // "faults: 13 (kill 4, partition 3, pause 3, slow 3); leaders killed: 2"
    let faults = out
        .lines()
        .find(|l| l.starts_with("faults:"))
        .unwrap_or_else(|| panic!("no faults line: {out}"));
    for kind in &kinds {
        assert!(
            number_after(faults, &format!("{kind} ")).unwrap_or(0) >= 1,
            "no {kind}: {out}"
        );
    }
    assert!(
        number_after(faults, "leaders killed:").unwrap_or(0) >= 1,
        "{out}"
    );
    // The membership change completed under the leader's death; the skewed
    // clocks showed on the nodes.
    assert!(out.contains("membership changes:"), "{out}");
    assert!(!out.contains("never completed"), "{out}");
    if kinds.contains(&"clock") {
        let line = out
            .lines()
            .find(|l| l.starts_with("clock faults:"))
            .unwrap_or_else(|| panic!("no clock line: {out}"));
        assert!(number_after(line, "set,").unwrap_or(0) >= 1, "{out}");
    }
    // Check 4 ran: every block of the keys' last values at its copies on disk;
    // every flipped copy good again (or collected).
    let line = out
        .lines()
        .find(|l| l.starts_with("redundancy:"))
        .unwrap_or_else(|| panic!("no redundancy line: {out}"));
    assert!(line.contains(", 0 with fewer than 3 good copies"), "{out}");
    assert!(
        !line.contains("(0 erasure-coded)"),
        "no erasure-coded block: {out}"
    );
    let flipped = out
        .lines()
        .find(|l| l.starts_with("flipped copies:"))
        .unwrap_or_else(|| panic!("no flipped copies line: {out}"));
    assert!(
        number_after(flipped, "flipped copies:").unwrap_or(0) >= 1,
        "{out}"
    );
    // The history names every operation; unanswered ones are there too.
    let text = std::fs::read_to_string(dir.path().join("h.jsonl")).unwrap();
    let lines = text.lines().count();
    assert!(lines > 300, "{lines} lines");
    // The same verdict from the file alone.
    let (ok, again, err) = cairn_in(
        dir.path(),
        &["chaos", "--check", "h.jsonl"],
        Duration::from_secs(120),
    );
    assert!(ok, "{again}\n{err}");
    assert!(again.contains("PASSED"), "{again}");
    // The cluster's directory is gone: only the history is left.
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["h.jsonl".to_string()]);
}

const HEADER: &str = r#"{"format":1,"bucket":"chaos","keys":["a/0"]}"#;

fn op(id: u64, call: &str, from: u64, to: u64, result: &str) -> String {
    format!(
        r#"{{"id":{id},"client":{id},"node":0,"key":"a/0",{call},"invoked_us":{from},"completed_us":{to},{result}}}"#
    )
}

#[test]
fn saved_histories_that_break_the_rules_fail_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let put = |v: u64| format!(r#""op":"put","value":{v}"#);
    let get = r#""op":"get""#;
    let ok = r#""result":"ok""#;
    let found = |v: u64| format!(r#""result":"found","value":{v}"#);
    let cases = [
        (
            "stale",
            vec![
                op(0, &put(1), 0, 10, ok),
                op(1, &put(2), 20, 30, ok),
                op(2, get, 40, 50, &found(1)),
            ],
            "NOT LINEARIZABLE: key a/0 (3 operations",
        ),
        (
            "lost",
            vec![
                op(0, &put(1), 0, 10, ok),
                op(1, get, 40, 50, r#""result":"not_found""#),
            ],
            "LOST: key a/0",
        ),
        (
            "twice",
            vec![
                op(0, r#""op":"put_if_absent","value":1"#, 0, 10, ok),
                op(1, r#""op":"put_if_absent","value":2"#, 20, 30, ok),
            ],
            "NOT LINEARIZABLE: key a/0",
        ),
    ];
    for (name, ops, want) in cases {
        let file = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&file, format!("{HEADER}\n{}\n", ops.join("\n"))).unwrap();
        let (ok, out, err) = cairn_in(
            dir.path(),
            &["chaos", "--check", &format!("{name}.jsonl")],
            Duration::from_secs(60),
        );
        assert!(!ok, "{name}: {out}");
        assert!(out.contains(want), "{name}: {out}");
        assert!(out.contains("FAILED"), "{name}: {out}");
        assert!(err.contains("fails its checks"), "{name}: {err}");
    }
    // A run whose blocks did not get their copies back (check 4), and whose
    // flipped copy stayed bad, fails on its record alone.
    let block = "ab".repeat(32);
    let header = format!(
        r#"{{"format":1,"bucket":"chaos","keys":["a/0"],"run":{{"seed":1,"nodes":5,"zones":3,"clients":1,"faults_enabled":["corrupt"],"faults":[{{"kind":"corrupt","node":1,"detail":"block abababababababab","leader":false,"block":"{block}","repaired":false,"from_us":5,"to_us":5}}],"min_acked":0,"settle_ms":0,"elections":0,"redundancy":{{"copies_wanted":3,"blocks":1,"short":[["a/0","{block}",2]],"waited_ms":120000,"scrub_checked":9,"scrub_corrupt":1,"scrub_repaired":0,"scrub_unrepairable":1,"scrub_unfinished":false}}}}}}"#
    );
    std::fs::write(
        dir.path().join("short.jsonl"),
        format!("{header}\n{}\n", op(0, &put(1), 0, 10, ok)),
    )
    .unwrap();
    let (ok, out, _) = cairn_in(
        dir.path(),
        &["chaos", "--check", "short.jsonl"],
        Duration::from_secs(60),
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("CHECK FAILED: key a/0: block abababababababab has 2 good copies, 3 wanted"),
        "{out}"
    );
    assert!(
        out.contains("CHECK FAILED: the copy of block abababababababab flipped on node 1"),
        "{out}"
    );
    // A damaged file is refused with the line named.
    std::fs::write(
        dir.path().join("bad.jsonl"),
        format!("{HEADER}\n{{\"id\":\n"),
    )
    .unwrap();
    let (ok, _, err) = cairn_in(
        dir.path(),
        &["chaos", "--check", "bad.jsonl"],
        Duration::from_secs(60),
    );
    assert!(!ok);
    assert!(err.contains("line 2"), "{err}");
}
