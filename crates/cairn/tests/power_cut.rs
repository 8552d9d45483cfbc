//! The power-cut test: kill -9 cannot show a missing fsync (the page cache outlives
//! the process), so this test traces a real server's system calls (strace) and checks
//! that for every acknowledged PUT, each block file was fsynced before its rename into
//! place, its directory was fsynced after the rename, and the metadata Raft log's last
//! write was durable (a write to a file opened with O_DSYNC, or an fsync after it),
//! all before the response was written. Each variant
//! that leaves one of those fsyncs out (a test hook) must make the check fail.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

#[derive(Debug)]
enum Ev {
    /// fsync or fdatasync of a path, or a write to a file opened with O_DSYNC, completed.
    Sync(String),
    Rename(String, String),
    MetaWrite,
    /// An HTTP 200 response started.
    Response,
}

/// A response or metadata write, which counts from the moment it starts.
fn started_write(call: &str) -> Option<Ev> {
    let is_write =
        call.starts_with("writev(") || call.starts_with("write(") || call.starts_with("sendto(");
    if is_write && call.contains("HTTP/1.1 200") {
        return Some(Ev::Response);
    }
    // A write to a segment of the metadata Raft log (`raft/log/*.seg`).
    if call.starts_with("pwrite64(") && call.contains(".seg>") {
        return Some(Ev::MetaWrite);
    }
    None
}

/// Events of a `strace -f -y -yy` log, in the order they took effect.
fn parse(trace: &str) -> Vec<Ev> {
    let mut pending: HashMap<String, String> = HashMap::new();
    // Files opened with O_DSYNC: a write to one is durable when it returns.
    let mut dsync: std::collections::HashSet<String> = Default::default();
    let mut out = Vec::new();
    let path_of = |call: &str| -> Option<String> {
        let start = call.find('<')? + 1;
        let end = start + call[start..].find('>')?;
        Some(call[start..end].to_string())
    };
    for line in trace.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let (call, finished) = if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            // Writes count from when they start; the response may be under way.
            out.extend(started_write(head));
            pending.insert(pid.to_string(), head.to_string());
            continue;
        } else if rest.starts_with("<...") {
            let Some(head) = pending.remove(pid) else {
                continue;
            };
            let tail = rest.split_once('>').map(|x| x.1).unwrap_or("");
            (format!("{head}{tail}"), true)
        } else {
            (rest.to_string(), false)
        };
        let ok = call.trim_end().ends_with("= 0") || call.contains(") = ");
        if call.starts_with("openat(") {
            let quoted: Vec<&str> = call.split('"').collect();
            if quoted.len() >= 3 && quoted[2].contains("O_DSYNC") && !call.contains("= -1") {
                dsync.insert(quoted[1].to_string());
            }
            continue;
        }
        let durable_write = call.starts_with("pwrite64(")
            && !call.contains("= -1")
            && path_of(&call).is_some_and(|p| dsync.contains(&p));
        if call.starts_with("fsync(") || call.starts_with("fdatasync(") {
            if call.trim_end().ends_with("= 0")
                && let Some(p) = path_of(&call)
            {
                out.push(Ev::Sync(p));
            }
        } else if call.starts_with("rename(")
            || call.starts_with("renameat2(")
            || call.starts_with("renameat(")
        {
            let quoted: Vec<&str> = call.split('"').collect();
            if quoted.len() >= 4 && call.trim_end().ends_with("= 0") {
                out.push(Ev::Rename(quoted[1].to_string(), quoted[3].to_string()));
            }
        } else if !finished && ok {
            out.extend(started_write(&call));
        }
        if durable_write && let Some(p) = path_of(&call) {
            out.push(Ev::Sync(p));
        }
    }
    out
}

/// Checks every acknowledged request's fsyncs; returns (problems, responses with
/// block writes, responses with metadata commits).
fn check(events: &[Ev]) -> (Vec<String>, usize, usize) {
    let mut problems = Vec::new();
    let (mut with_blocks, mut with_meta) = (0, 0);
    let mut seg: Vec<&Ev> = Vec::new();
    for ev in events {
        if !matches!(ev, Ev::Response) {
            seg.push(ev);
            continue;
        }
        let mut saw_block = false;
        for (i, e) in seg.iter().enumerate() {
            let Ev::Rename(from, to) = e else { continue };
            if !to.contains("/blocks/") {
                continue;
            }
            saw_block = true;
            if !seg[..i]
                .iter()
                .any(|x| matches!(x, Ev::Sync(p) if p == from))
            {
                problems.push(format!(
                    "block file {from} was not fsynced before its rename"
                ));
            }
            let dir = Path::new(to)
                .parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            if !seg[i + 1..]
                .iter()
                .any(|x| matches!(x, Ev::Sync(p) if *p == dir))
            {
                problems.push(format!(
                    "directory {dir} was not fsynced after the rename of {to}"
                ));
            }
        }
        // Every 200 in these runs answers a write, so each needs a metadata commit.
        match seg.iter().rposition(|e| matches!(e, Ev::MetaWrite)) {
            Some(last) => {
                with_meta += 1;
                if !seg[last + 1..].iter().any(|x| matches!(x, Ev::Sync(p) if p.ends_with(".seg"))) {
                    problems.push("the metadata log was not fsynced after its last write".into());
                }
            }
            None => problems.push("a write was acknowledged with no metadata log write: the metadata log was not written and fsynced".into()),
        }
        with_blocks += saw_block as usize;
        seg.clear();
    }
    (problems, with_blocks, with_meta)
}

/// Runs a traced server, makes sequential PUTs (3 with blocks, 3 inline), returns the
/// check's result.
fn traced_run(skip: Option<&str>) -> (Vec<String>, usize, usize) {
    let root_guard = tempfile::tempdir().unwrap();
    let root = root_guard.path();
    let data_dir = root.join("data");
    let trace = root.join("trace");
    // Create the directory first, untraced, so that only serving is in the trace.
    drop(Server::start_in(&data_dir, &[]));
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-y", "-yy", "-s", "48", "-e"])
        .arg("trace=openat,fsync,fdatasync,rename,renameat,renameat2,write,writev,sendto,pwrite64")
        .arg("-o")
        .arg(&trace)
        .arg(binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(&data_dir)
        .args([
            "--s3-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ])
        .env("CAIRN_ACCESS_KEY", ACCESS_KEY)
        .env("CAIRN_SECRET_KEY", SECRET_KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(s) = skip {
        cmd.env("CAIRN_UNSAFE_TEST_SKIP_FSYNC", s);
    }
    // A process group of its own: killing strace alone would leave the traced
    // server running, detached.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().expect("strace runs");
    let endpoint = {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut ep = String::new();
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 0 {
            if let Some(v) = line.trim().strip_prefix("S3 endpoint:") {
                ep = v.trim().to_string();
            }
            if line.trim() == "ready" {
                break;
            }
            line.clear();
        }
        std::thread::spawn(move || {
            let mut sink = String::new();
            while r.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        ep
    };
    for (size, ops) in [("5MiB", "3"), ("1KiB", "3")] {
        let out = Command::new(binary())
            .args([
                "bench",
                "--endpoint",
                &endpoint,
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ])
            .args([
                "--op", "put", "--size", size, "--ops", ops, "--bucket", "powercut",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.wait();
    let text = std::fs::read_to_string(&trace).unwrap();
    check(&parse(&text))
}

fn have_strace() -> bool {
    Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn every_acknowledged_put_is_fsynced_before_its_response() {
    if !have_strace() {
        eprintln!("SKIPPED: strace is not installed (./test.sh installs it)");
        return;
    }
    let (problems, with_blocks, with_meta) = traced_run(None);
    assert!(problems.is_empty(), "{problems:#?}");
    // The 3 block PUTs (and the bucket creation and 3 inline PUTs for metadata).
    assert!(
        with_blocks >= 3,
        "only {with_blocks} responses followed block writes"
    );
    assert!(
        with_meta >= 7,
        "only {with_meta} responses followed metadata commits"
    );
}

#[test]
fn the_check_catches_each_missing_fsync() {
    if !have_strace() {
        eprintln!("SKIPPED: strace is not installed (./test.sh installs it)");
        return;
    }
    for (skip, expect) in [
        ("block", "was not fsynced before its rename"),
        ("dir", "was not fsynced after the rename"),
        ("meta", "metadata log was not fsynced"),
    ] {
        let (problems, _, _) = traced_run(Some(skip));
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "skipping the {skip} fsync went unnoticed: {problems:#?}"
        );
    }
}
