//! `cairn backup` and `cairn restore` against a real `cairn serve`: a chain of
//! full, incremental and differential backups restores each moment exactly;
//! encrypted backups show no plain bytes and need their key.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use aws_sdk_s3::primitives::ByteStream;
use common::{ACCESS_KEY, SECRET_KEY, Server, bytes};

/// An object as a user sees it: bytes, content type, user metadata.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Obj {
    data: Vec<u8>,
    content_type: String,
    meta: BTreeMap<String, String>,
}

/// A server with an empty bucket `media`, and a folder for a target.
async fn start() -> (
    Server,
    aws_sdk_s3::Client,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let srv = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("media").send().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("backups");
    (srv, s3, dir, target)
}

/// Runs `cairn ARGS` against `srv`; its exit status, stdout and stderr.
fn cairn(srv: &Server, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    // The commands that talk to a cairn are sent to this one.
    let talks = args.first() == Some(&"restore") || args.get(1) == Some(&"create");
    let endpoint: &[&str] = if talks {
        &["--endpoint", &srv.endpoint]
    } else {
        &[]
    };
    let out = Command::new(common::binary())
        .args(args)
        .args(endpoint)
        .env("CAIRN_ACCESS_KEY", ACCESS_KEY)
        .env("CAIRN_SECRET_KEY", SECRET_KEY)
        .env_remove("CAIRN_BACKUP_KEY")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn backup(srv: &Server, target: &Path, kind: &str, extra: &[&str]) -> String {
    let t = target.to_str().unwrap();
    let mut args = vec![
        "backup", "create", "--target", t, "--bucket", "media", "--type", kind,
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = cairn(srv, &args, &[]);
    assert!(ok, "backup failed:\n{out}\n{err}");
    out.lines().last().unwrap().trim().to_string()
}

/// Restores backup `pick` (`["--id", ID]` or `["--at", TIME]`) of bucket
/// `media` into bucket `into`.
fn restore(
    srv: &Server,
    target: &Path,
    pick: [&str; 2],
    into: &str,
    extra: &[&str],
) -> (bool, String, String) {
    let t = target.to_str().unwrap();
    let mut args = vec![
        "restore",
        "--target",
        t,
        pick[0],
        pick[1],
        "--bucket",
        "media",
        "--to-bucket",
        into,
    ];
    args.extend_from_slice(extra);
    cairn(srv, &args, &[])
}

async fn put(s3: &aws_sdk_s3::Client, key: &str, o: &Obj) {
    put_in(s3, "media", key, o).await
}

async fn put_in(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, o: &Obj) {
    let mut req = s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .content_type(&o.content_type)
        .body(ByteStream::from(o.data.clone()));
    for (k, v) in &o.meta {
        req = req.metadata(k, v);
    }
    req.send().await.unwrap();
}

/// Every object of `bucket`, read back whole.
async fn contents(s3: &aws_sdk_s3::Client, bucket: &str) -> BTreeMap<String, Obj> {
    let mut out = BTreeMap::new();
    let list = s3.list_objects_v2().bucket(bucket).send().await.unwrap();
    for o in list.contents() {
        let key = o.key().unwrap().to_string();
        let got = s3
            .get_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .unwrap();
        let meta = got
            .metadata()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let content_type = got.content_type().unwrap_or_default().to_string();
        let data = got.body.collect().await.unwrap().into_bytes().to_vec();
        out.insert(
            key,
            Obj {
                data,
                content_type,
                meta,
            },
        );
    }
    out
}

fn obj(n: usize, seed: u64, kind: &str) -> Obj {
    Obj {
        data: bytes(n, seed),
        content_type: format!("video/{kind}"),
        meta: BTreeMap::from([("seed".to_string(), seed.to_string())]),
    }
}

/// Full, then changes (objects added, overwritten, deleted), incremental, more
/// changes, differential, more, incremental: each backup restored into a fresh
/// bucket holds exactly what the bucket held when it was taken (keys, bytes,
/// content type, user metadata); `--at` picks the latest backup at or before a
/// time; a non-empty bucket is refused without --force and made equal with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_backup_of_a_chain_restores_its_moment() {
    let (srv, s3, _dir, target) = start().await;
    // An object of more than one chunk (8 MiB) among small ones, and an empty one.
    let mut live: BTreeMap<String, Obj> = BTreeMap::new();
    for (k, o) in [
        ("a.mp4", obj(9 << 20, 1, "mp4")),
        ("b.mp4", obj(1000, 2, "mp4")),
        ("c/d.webm", obj(200_000, 3, "webm")),
        ("empty", obj(0, 4, "x")),
    ] {
        put(&s3, k, &o).await;
        live.insert(k.to_string(), o);
    }
    let mut moments = vec![(backup(&srv, &target, "full", &[]), live.clone())];
    let changes: [&[(&str, Option<Obj>)]; 3] = [
        &[
            ("b.mp4", Some(obj(1500, 5, "mp4"))),
            ("new", Some(obj(10, 6, "x"))),
            ("c/d.webm", None),
        ],
        &[("a.mp4", None), ("c/e", Some(obj(3000, 7, "x")))],
        &[("new", None), ("b.mp4", Some(obj(100, 8, "mp4")))],
    ];
    for (step, kind) in changes
        .iter()
        .zip(["incremental", "differential", "incremental"])
    {
        for (k, o) in step.iter() {
            match o {
                Some(o) => {
                    put(&s3, k, o).await;
                    live.insert(k.to_string(), o.clone());
                }
                None => {
                    s3.delete_object()
                        .bucket("media")
                        .key(*k)
                        .send()
                        .await
                        .unwrap();
                    live.remove(*k);
                }
            }
        }
        moments.push((backup(&srv, &target, kind, &[]), live.clone()));
    }
    // The list shows the chain.
    let (ok, out, err) = cairn(
        &srv,
        &[
            "backup",
            "list",
            "--target",
            target.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let list = list.as_array().unwrap();
    let types: Vec<&str> = list.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["full", "incremental", "differential", "incremental"]
    );
    assert_eq!(list[1]["parent"], list[0]["id"]);
    assert_eq!(
        list[2]["parent"], list[0]["id"],
        "a differential counts from the full one"
    );
    assert_eq!(list[3]["parent"], list[2]["id"]);
    // An incremental backup reads only what changed.
    assert!(list[1]["bytes_new"].as_u64().unwrap() < 2000, "{}", list[1]);
    for (i, (id, want)) in moments.iter().enumerate() {
        assert_eq!(list[i]["id"].as_str(), Some(id.as_str()));
        assert_eq!(list[i]["objects"].as_u64(), Some(want.len() as u64));
        let into = format!("restored-{i}");
        let (ok, out, err) = restore(&srv, &target, ["--id", id], &into, &[]);
        assert!(ok, "restore {i} failed:\n{out}\n{err}");
        assert_eq!(&contents(&s3, &into).await, want, "backup {i} ({id})");
    }
    // --at: the time of the third backup picks it.
    let at = list[2]["time"].as_str().unwrap();
    let (ok, out, err) = restore(&srv, &target, ["--at", at], "at-time", &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(contents(&s3, "at-time").await, moments[2].1);
    // Into a bucket that holds something: refused, then made equal with --force.
    let first = ["--id", moments[0].0.as_str()];
    let (ok, _, err) = restore(&srv, &target, first, "restored-3", &[]);
    assert!(!ok && err.contains("not empty"), "{err}");
    assert_eq!(
        contents(&s3, "restored-3").await,
        moments[3].1,
        "a refused restore changed the bucket"
    );
    let (ok, _, err) = restore(&srv, &target, first, "restored-3", &["--force"]);
    assert!(ok, "{err}");
    assert_eq!(contents(&s3, "restored-3").await, moments[0].1);
}

/// A backup of every bucket merges each bucket's listing with what its parent
/// held, in order: deletes at the start and end of a bucket, next to another
/// bucket's keys, are kept apart from that bucket; each bucket restores to its
/// own moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_every_bucket_keeps_each_buckets_changes_apart() {
    let (srv, s3, _dir, target) = start().await;
    let t = target.to_str().unwrap();
    for b in ["alpha", "zeta"] {
        s3.create_bucket().bucket(b).send().await.unwrap();
    }
    let mut live: BTreeMap<&str, BTreeMap<String, Obj>> = BTreeMap::new();
    let mut seed = 0;
    for (b, k) in [
        ("alpha", "a1"),
        ("alpha", "a9"),
        ("media", "m1"),
        ("zeta", "z1"),
        ("zeta", "z5"),
    ] {
        seed += 1;
        let o = obj(100 + seed as usize, seed, "x");
        put_in(&s3, b, k, &o).await;
        live.entry(b).or_default().insert(k.to_string(), o);
    }
    let all = |kind: &'static str| {
        let (ok, out, err) = cairn(
            &srv,
            &["backup", "create", "--target", t, "--type", kind],
            &[],
        );
        assert!(ok, "backup failed:\n{out}\n{err}");
        out.lines().last().unwrap().trim().to_string()
    };
    let full = all("full");
    let at_full = live.clone();
    // The last key of alpha and the first of zeta go, media's only key is
    // overwritten, alpha gains one in its middle.
    for (b, k) in [("alpha", "a9"), ("zeta", "z1")] {
        s3.delete_object().bucket(b).key(k).send().await.unwrap();
        live.get_mut(b).unwrap().remove(k);
    }
    for (b, k) in [("media", "m1"), ("alpha", "a5")] {
        seed += 1;
        let o = obj(200 + seed as usize, seed, "y");
        put_in(&s3, b, k, &o).await;
        live.get_mut(b).unwrap().insert(k.to_string(), o);
    }
    let id = all("incremental");
    let listed = list(&srv, &target);
    let objects: usize = live.values().map(BTreeMap::len).sum();
    assert_eq!(objects, 4);
    assert_eq!(
        listed[1]["objects"].as_u64(),
        Some(objects as u64),
        "{}",
        listed[1]
    );
    for (b, want) in &live {
        let into = format!("{b}-back");
        let (ok, out, err) = cairn(
            &srv,
            &[
                "restore",
                "--target",
                t,
                "--id",
                &id,
                "--bucket",
                b,
                "--to-bucket",
                &into,
            ],
            &[],
        );
        assert!(ok, "restore of {b} failed:\n{out}\n{err}");
        assert_eq!(&contents(&s3, &into).await, want, "bucket {b}");
    }
    // --prefix with --force: under the prefix, the bucket is made what the
    // backup held there; beside it, nothing is touched.
    let extra = obj(77, 77, "z");
    for k in ["a5-extra", "zz-extra"] {
        put_in(&s3, "alpha-back", k, &extra).await;
    }
    let (ok, out, err) = cairn(
        &srv,
        &[
            "restore",
            "--target",
            t,
            "--id",
            &full,
            "--bucket",
            "alpha",
            "--to-bucket",
            "alpha-back",
            "--prefix",
            "a",
            "--force",
        ],
        &[],
    );
    assert!(ok, "restore with a prefix failed:\n{out}\n{err}");
    let mut want = at_full["alpha"].clone();
    want.insert("zz-extra".into(), extra);
    assert_eq!(contents(&s3, "alpha-back").await, want);
}

/// With a key, no byte the objects hold appears in the target's files; without
/// the key, or with another, the backups are refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_backups_show_nothing_and_need_their_key() {
    let (srv, s3, dir, target) = start().await;
    let key = dir.path().join("key");
    let other = dir.path().join("other");
    for k in [&key, &other] {
        let (ok, _, err) = cairn(&srv, &["backup", "keygen", k.to_str().unwrap()], &[]);
        assert!(ok, "{err}");
    }
    let (again, _, _) = cairn(&srv, &["backup", "keygen", key.to_str().unwrap()], &[]);
    assert!(!again, "keygen replaced a key");
    let marker = b"PLAINTEXT-MARKER-cairn-4711 ".repeat(2000);
    let o = Obj {
        data: marker.clone(),
        content_type: "text/plain".into(),
        meta: BTreeMap::from([("title".to_string(), "PLAINTEXT-MARKER-title".to_string())]),
    };
    put(&s3, "secret.txt", &o).await;
    let kf = key.to_str().unwrap();
    let id = backup(&srv, &target, "full", &["--key-file", kf]);
    let mut files = 0;
    for e in walk(&target) {
        let b = std::fs::read(&e).unwrap();
        files += 1;
        assert!(
            !b.windows(16).any(|w| w == b"PLAINTEXT-MARKER"),
            "{} holds plain bytes",
            e.display()
        );
    }
    assert!(files >= 3, "{files} files at the target");
    let restore = |extra: &[&str]| restore(&srv, &target, ["--id", &id], "back", extra);
    let (ok, _, err) = restore(&[]);
    assert!(!ok && err.contains("encrypted"), "{err}");
    let (ok, _, err) = restore(&["--key-file", other.to_str().unwrap()]);
    assert!(!ok && err.contains("not the one"), "{err}");
    let (ok, _, err) = restore(&["--key-file", kf]);
    assert!(ok, "{err}");
    let got = contents(&s3, "back").await;
    assert_eq!(got.get("secret.txt"), Some(&o));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Flips one byte in the middle of the chunk file holding `plain` (chunks
/// are named by the BLAKE3 of their bytes), its size kept; the chunk's name.
fn flip_chunk(target: &Path, plain: &[u8]) -> String {
    let h = blake3::hash(plain).to_hex().to_string();
    let chunk = format!("chunks/{}/{h}", &h[..2]);
    let path = target.join(&chunk);
    let mut b = std::fs::read(&path).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x10;
    std::fs::write(&path, &b).unwrap();
    chunk
}

/// A byte flipped in a chunk (its size kept) and a damaged manifest: verify
/// exits non-zero naming the manifest (and, reading the data, the chunk too);
/// a restore exits non-zero naming the chunk and writes every object but the
/// one whose bytes are bad.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_restore_name_damaged_files_and_write_no_bad_object() {
    let (srv, s3, _dir, target) = start().await;
    let t = target.to_str().unwrap();
    let (good, bad) = (obj(5000, 11, "mp4"), obj(300_000, 12, "mp4"));
    put(&s3, "good", &good).await;
    put(&s3, "bad", &bad).await;
    let first = backup(&srv, &target, "full", &[]);
    put(&s3, "later", &obj(100, 13, "x")).await;
    let second = backup(&srv, &target, "incremental", &[]);
    let verify = |extra: &[&str]| {
        let mut args = vec!["backup", "verify", "--target", t];
        args.extend_from_slice(extra);
        cairn(&srv, &args, &[])
    };
    let (ok, out, err) = verify(&["--read-data"]);
    assert!(ok && out.contains(": 0 problems"), "{out}\n{err}");
    // The chunk of `bad` (one chunk): one byte flipped in place.
    let chunk = flip_chunk(&target, &bad.data);
    let manifest = format!("backups/{second}/manifest");
    let mpath = target.join(&manifest);
    let mut m = std::fs::read(&mpath).unwrap();
    let at = m.len() - 3;
    m[at] ^= 0x55;
    std::fs::write(&mpath, &m).unwrap();
    let (ok, _, err) = verify(&[]);
    assert!(!ok && err.contains(&manifest), "{err}");
    let (ok, _, err) = verify(&["--read-data"]);
    assert!(
        !ok && err.contains(&manifest) && err.contains(&chunk),
        "{err}"
    );
    // The restore of the first backup names the chunk and leaves `bad` out.
    let (ok, _, err) = restore(&srv, &target, ["--id", &first], "back", &[]);
    assert!(
        !ok && err.contains(&chunk) && err.contains("media/bad"),
        "{err}"
    );
    let got = contents(&s3, "back").await;
    assert_eq!(got.keys().collect::<Vec<_>>(), ["good"]);
    assert_eq!(got["good"], good);
}

/// Objects of every size around the chunk (8 MiB) and small-buffer (1 MiB)
/// boundaries, among many small ones, come back exactly from a restore that
/// writes many at once; a damaged chunk inside a multipart object leaves that
/// object out, is named, and leaves no upload open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_every_size_restore_exactly_and_a_bad_part_leaves_no_upload_open() {
    let (srv, s3, _dir, target) = start().await;
    let mut want = BTreeMap::new();
    let small = (0..60).map(|i| (format!("s/{i:03}"), i * 83 % 5000));
    let edges = [
        ("edge/1m-1", (1 << 20) - 1),
        ("edge/1m", 1 << 20),
        ("edge/1m+1", (1 << 20) + 1),
        ("edge/8m", 8 << 20),
        ("edge/8m+1", (8 << 20) + 1),
        ("big", 17 << 20),
    ]
    .map(|(k, n)| (k.to_string(), n));
    for (i, (k, n)) in small.chain(edges).enumerate() {
        let o = obj(n, 100 + i as u64, "x");
        put(&s3, &k, &o).await;
        want.insert(k, o);
    }
    let id = backup(&srv, &target, "full", &[]);
    let (ok, out, err) = restore(&srv, &target, ["--id", &id], "copy", &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(contents(&s3, "copy").await, want);
    // With --force, more than a listing page (and a delete request) of
    // objects the backup does not hold go.
    let extra = obj(10, 7, "x");
    let (s3r, extra) = (&s3, &extra);
    for batch in (0..1100).collect::<Vec<_>>().chunks(50) {
        let puts = batch
            .iter()
            .map(|i| async move { put_in(s3r, "copy", &format!("x/{i:04}"), extra).await });
        futures::future::join_all(puts).await;
    }
    let (ok, out, err) = restore(&srv, &target, ["--id", &id], "copy", &["--force"]);
    assert!(ok, "{out}\n{err}");
    let left = s3
        .list_objects_v2()
        .bucket("copy")
        .prefix("x/")
        .send()
        .await
        .unwrap();
    assert_eq!(left.key_count(), Some(0));
    assert_eq!(contents(&s3, "copy").await, want);
    // The second of big's three chunks: one byte flipped in place.
    let chunk = flip_chunk(&target, &want["big"].data[8 << 20..16 << 20]);
    let (ok, _, err) = restore(&srv, &target, ["--id", &id], "copy2", &[]);
    assert!(
        !ok && err.contains(&chunk) && err.contains("media/big"),
        "{err}"
    );
    want.remove("big");
    assert_eq!(contents(&s3, "copy2").await, want);
    let open = s3
        .list_multipart_uploads()
        .bucket("copy2")
        .send()
        .await
        .unwrap();
    assert!(open.uploads().is_empty(), "{:?}", open.uploads());
}

/// A second cairn as the S3 target: a backup there (under a prefix), listed,
/// verified and restored back into the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_to_another_cairn_restores_back() {
    let srv = Server::start();
    let other = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("media").send().await.unwrap();
    other
        .client()
        .create_bucket()
        .bucket("vault")
        .send()
        .await
        .unwrap();
    let mut want = BTreeMap::new();
    for (k, o) in [("x", obj(9 << 20, 21, "mp4")), ("y/z", obj(700, 22, "x"))] {
        put(&s3, k, &o).await;
        want.insert(k.to_string(), o);
    }
    let env = [
        ("CAIRN_TARGET_ACCESS_KEY", ACCESS_KEY),
        ("CAIRN_TARGET_SECRET_KEY", SECRET_KEY),
    ];
    let to = [
        "--target",
        "s3://vault/cairn/backups",
        "--target-endpoint",
        &other.endpoint,
    ];
    let with = |args: &[&str]| -> (bool, String, String) {
        let mut all = args.to_vec();
        all.extend_from_slice(&to);
        cairn(&srv, &all, &env)
    };
    let (ok, out, err) = with(&["backup", "create", "--bucket", "media"]);
    assert!(ok, "{out}\n{err}");
    let id = out.lines().last().unwrap().trim().to_string();
    let (ok, out, err) = with(&["backup", "list", "--json"]);
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["id"].as_str(), Some(id.as_str()));
    assert_eq!(list[0]["type"], "full");
    let (ok, out, err) = with(&["backup", "verify", "--read-data"]);
    assert!(ok, "{out}\n{err}");
    // The target holds the backup's files under the prefix, and nothing else.
    let held = other
        .client()
        .list_objects_v2()
        .bucket("vault")
        .send()
        .await
        .unwrap();
    assert!(held.contents().len() >= 4);
    assert!(
        held.contents()
            .iter()
            .all(|o| o.key().unwrap().starts_with("cairn/backups/"))
    );
    let (ok, out, err) = with(&[
        "restore",
        "--id",
        &id,
        "--bucket",
        "media",
        "--to-bucket",
        "media-back",
    ]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(contents(&s3, "media-back").await, want);
}

/// kill -9 during a backup, after some chunks and before its manifest: the
/// partial backup is not listed; the next run takes over the dead run's lock,
/// uploads only the chunks still missing, verifies and restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_midway_is_invisible_and_the_next_run_completes_it() {
    let (srv, s3, _dir, target) = start().await;
    let t = target.to_str().unwrap();
    let mut want = BTreeMap::new();
    for i in 0..150u64 {
        let o = obj(100_000, 100 + i, "x");
        put(&s3, &format!("o{i:03}"), &o).await;
        want.insert(format!("o{i:03}"), o);
    }
    let count = |sub: &str| walk_or_empty(&target.join(sub)).len();
    let mut child = Command::new(common::binary())
        .args([
            "backup",
            "create",
            "--target",
            t,
            "--bucket",
            "media",
            "--endpoint",
            &srv.endpoint,
        ])
        .env("CAIRN_ACCESS_KEY", ACCESS_KEY)
        .env("CAIRN_SECRET_KEY", SECRET_KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count("chunks") < 20 {
        assert!(std::time::Instant::now() < deadline, "no chunks written");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let before = count("chunks");
    assert!(before < 150, "the whole backup was written before the kill");
    assert_eq!(count("backups"), 0, "a manifest was written");
    let (ok, out, err) = cairn(&srv, &["backup", "list", "--target", t], &[]);
    assert!(ok && out.contains("no backups"), "{out}\n{err}");
    // The next run: the dead run's lock taken over, only the missing chunks written.
    let (ok, out, err) = cairn(
        &srv,
        &[
            "backup", "create", "--target", t, "--bucket", "media", "--json",
        ],
        &[],
    );
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("took over the lock"), "{err}");
    let b: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sizes: u64 = walk_or_empty(&target.join("chunks"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let stored = b["bytes_stored"].as_u64().unwrap();
    assert!(stored < sizes, "{stored} bytes stored again of {sizes}");
    assert_eq!(b["objects"].as_u64(), Some(150));
    let (ok, out, err) = cairn(
        &srv,
        &["backup", "verify", "--target", t, "--read-data"],
        &[],
    );
    assert!(ok, "{out}\n{err}");
    let (ok, _, err) = restore(
        &srv,
        &target,
        ["--id", b["id"].as_str().unwrap()],
        "back",
        &[],
    );
    assert!(ok, "{err}");
    assert_eq!(contents(&s3, "back").await, want);
}

fn walk_or_empty(dir: &Path) -> Vec<std::path::PathBuf> {
    if dir.exists() { walk(dir) } else { Vec::new() }
}

/// Retention: `--keep-within` keeps every recent backup; `--keep-full 2` keeps
/// the two newest full backups and what counts from them, deletes the rest and
/// the chunks only they named; every kept backup still verifies and restores
/// its moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_every_chain_it_must() {
    let (srv, s3, _dir, target) = start().await;
    let t = target.to_str().unwrap();
    let mut live = BTreeMap::new();
    let mut moments = Vec::new();
    for (i, kind) in [
        "full",
        "incremental",
        "full",
        "differential",
        "full",
        "incremental",
    ]
    .iter()
    .enumerate()
    {
        // Each step replaces one object: its old bytes are named by older backups only.
        let o = obj(50_000, 200 + i as u64, "x");
        put(&s3, &format!("k{}", i % 2), &o).await;
        live.insert(format!("k{}", i % 2), o);
        moments.push((backup(&srv, &target, kind, &[]), live.clone()));
    }
    let chunks = || walk(&target.join("chunks")).len();
    let (ok, out, err) = cairn(
        &srv,
        &[
            "backup",
            "prune",
            "--target",
            t,
            "--keep-full",
            "1",
            "--keep-within",
            "1d",
        ],
        &[],
    );
    assert!(
        ok && out.contains("6 backups kept, 0 deleted"),
        "{out}\n{err}"
    );
    let before = chunks();
    let (ok, out, err) = cairn(
        &srv,
        &["backup", "prune", "--target", t, "--keep-full", "2"],
        &[],
    );
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("4 backups kept, 2 deleted"), "{out}");
    assert!(chunks() < before, "no chunk deleted: {out}");
    let (ok, out, _) = cairn(&srv, &["backup", "list", "--target", t, "--json"], &[]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = moments[2..].iter().map(|m| m.0.as_str()).collect();
    assert_eq!(ids, want);
    let (ok, out, err) = cairn(
        &srv,
        &["backup", "verify", "--target", t, "--read-data"],
        &[],
    );
    assert!(ok, "{out}\n{err}");
    for (i, (id, state)) in moments.iter().enumerate().skip(2) {
        let into = format!("pruned-{i}");
        let (ok, _, err) = restore(&srv, &target, ["--id", id], &into, &[]);
        assert!(ok, "{err}");
        assert_eq!(&contents(&s3, &into).await, state, "backup {i}");
    }
}

/// The class of each bucket named in `cairn bucket list --json`.
fn classes(srv: &Server, admin: &[&str]) -> BTreeMap<String, serde_json::Value> {
    let mut args = vec!["bucket", "list", "--json"];
    args.extend_from_slice(admin);
    let (ok, out, err) = cairn(srv, &args, &[]);
    assert!(ok, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["name"].as_str().unwrap().to_string(), b["class"].clone()))
        .collect()
}

/// A bucket's own settings (its storage class) are recorded by a backup with
/// admin access and given back by a restore with admin access, before its
/// objects are written; without admin access both still work and say what they
/// leave out. The buckets' settings need the admin token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buckets_storage_class_comes_back_with_it() {
    let (srv, s3, _dir, target) = start().await;
    let t = target.to_str().unwrap();
    let token = std::fs::read_to_string(srv.dir.join("admin_token")).unwrap();
    let admin = [
        "--admin-endpoint",
        &srv.admin,
        "--admin-token",
        token.trim(),
    ];
    let with_admin = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&admin);
        let (ok, out, err) = cairn(&srv, &all, &[]);
        assert!(ok, "{all:?}:\n{out}\n{err}");
        (out, err)
    };
    // A single node takes no erasure coding; a class of the bucket's own
    // (not the cluster's default, `null`) tells the setting apart all the same.
    with_admin(&["bucket", "set-class", "media", "replicated"]);
    let o = obj(3 << 20, 31, "mp4");
    put(&s3, "v", &o).await;

    let (out, err) = with_admin(&["backup", "create", "--target", t, "--bucket", "media"]);
    assert!(!err.contains("not recorded"), "{err}");
    let id = out.lines().last().unwrap().trim().to_string();
    with_admin(&[
        "restore",
        "--target",
        t,
        "--id",
        &id,
        "--to-bucket",
        "copy",
        "--bucket",
        "media",
    ]);
    let got = classes(&srv, &admin);
    assert_eq!(got["media"], "replicated", "{got:?}");
    assert_eq!(
        got["copy"], "replicated",
        "the class did not come back: {got:?}"
    );
    assert_eq!(contents(&s3, "copy").await["v"], o);

    // Without admin access: said, not silently dropped; the objects still come back.
    let (ok, out, err) = restore(&srv, &target, ["--id", &id], "plain", &[]);
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("not restored: no admin access"), "{err}");
    assert_eq!(classes(&srv, &admin)["plain"], serde_json::Value::Null);
    assert_eq!(contents(&s3, "plain").await["v"], o);
    let (ok, out, err) = cairn(
        &srv,
        &["backup", "create", "--target", t, "--bucket", "media"],
        &[],
    );
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("not recorded: no admin access"), "{err}");

    // The buckets' settings are not for anyone without the token.
    let (ok, _, err) = cairn(
        &srv,
        &[
            "bucket",
            "list",
            "--admin-endpoint",
            &srv.admin,
            "--admin-token",
            "wrong",
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("admin token"), "{err}");
}

/// `cairn backup list --json` of a target.
fn list(srv: &Server, target: &Path) -> Vec<serde_json::Value> {
    let (ok, out, err) = cairn(
        srv,
        &[
            "backup",
            "list",
            "--json",
            "--target",
            target.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{out}\n{err}");
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Polls `check` every 200 ms until it gives a value, for at most `secs`.
fn wait_for<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            std::time::Instant::now() < end,
            "waited {secs} s for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A `[[backup]]` section in the server's config: backups are taken on their
/// own, full when the last full one is old enough and incremental between,
/// each restoring what the bucket held; the retention policy drops the older
/// chain once a newer full backup stands; runs are counted in the metrics. A bad
/// section keeps the server from starting, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_run_on_their_own_and_keep_to_their_retention() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("scheduled");
    let conf = dir.path().join("cairn.toml");
    std::fs::write(
        &conf,
        format!(
            "[[backup]]\ntarget = \"{}\"\nbuckets = [\"media\"]\ninterval = \"1s\"\n\
             full_every = \"6s\"\nkeep_full = 1\n",
            target.display()
        ),
    )
    .unwrap();
    let srv = Server::start_in(
        &dir.path().join("data"),
        &["--config", conf.to_str().unwrap()],
    );
    let s3 = srv.client();
    s3.create_bucket().bucket("media").send().await.unwrap();
    let mut want = BTreeMap::new();
    for (k, o) in [("a", obj(1000, 41, "mp4")), ("b", obj(9 << 20, 42, "mp4"))] {
        put(&s3, k, &o).await;
        want.insert(k.to_string(), o);
    }
    // A full backup, then incremental ones.
    let first_full = wait_for(30, "a full and an incremental backup", || {
        let l = list(&srv, &target);
        let full = l.iter().find(|b| b["type"] == "full")?;
        l.iter()
            .any(|b| b["type"] == "incremental")
            .then(|| full["id"].as_str().unwrap().to_string())
    });
    // A change is in the next backup, which restores the bucket as it is now.
    let late = obj(5000, 43, "webm");
    put(&s3, "late", &late).await;
    want.insert("late".into(), late);
    s3.delete_object()
        .bucket("media")
        .key("a")
        .send()
        .await
        .unwrap();
    want.remove("a");
    let n = list(&srv, &target).len();
    let newest = wait_for(30, "a backup after the change", || {
        let l = list(&srv, &target);
        let b = l.last()?;
        (l.len() > n && b["objects"] == 2).then(|| b["id"].as_str().unwrap().to_string())
    });
    let (ok, out, err) = restore(&srv, &target, ["--id", &newest], "copy", &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(contents(&s3, "copy").await, want);
    // A newer full backup: the first chain is pruned (keep_full = 1), and what
    // is left starts with a full backup and verifies.
    wait_for(30, "the first chain pruned", || {
        let l = list(&srv, &target);
        (!l.iter().any(|b| b["id"] == first_full.as_str()) && l[0]["type"] == "full").then_some(())
    });
    let t = target.to_str().unwrap();
    let (ok, out, err) = cairn(&srv, &["backup", "verify", "--target", t], &[]);
    assert!(ok, "{out}\n{err}");
    let metrics = common::admin_get(&srv.admin, "/metrics").unwrap();
    let ok_runs = metrics
        .lines()
        .find(|l| l.starts_with("cairn_backup_runs_total") && l.contains("result=\"ok\""))
        .unwrap_or_else(|| panic!("no backup run counted:\n{metrics}"));
    let runs: f64 = ok_runs.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(runs >= 3.0, "{ok_runs}");
    drop(srv);

    // A bad section: the server does not start, and says which field.
    std::fs::write(
        &conf,
        "[[backup]]\ntarget = \"/tmp/x\"\ninterval = \"soon\"\n",
    )
    .unwrap();
    let e = match Server::try_start_in(
        &dir.path().join("data2"),
        &["--config", conf.to_str().unwrap()],
        &[],
    ) {
        Ok(_) => panic!("a bad [[backup]] section was accepted"),
        Err(e) => e,
    };
    assert!(e.contains("backup.interval"), "{e}");
}
