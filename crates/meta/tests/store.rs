use cairn_meta::*;
use cairn_types::{BlockHash, BlockRef};

fn obj(etag: &str, blocks: &[&[u8]]) -> ObjectRecord {
    ObjectRecord {
        size: 1,
        etag: etag.into(),
        last_modified: 1000,
        headers: StoredHeaders::default(),
        checksums: Checksums::default(),
        parts_count: None,
        data: if blocks.is_empty() {
            ObjectData::Inline(b"x".to_vec())
        } else {
            ObjectData::Blocks(
                blocks
                    .iter()
                    .map(|b| BlockRef {
                        hash: BlockHash::of(b),
                        len: b.len() as u32,
                    })
                    .collect(),
            )
        },
    }
}

async fn store() -> (tempfile::TempDir, MetaStore) {
    let d = tempfile::tempdir().unwrap();
    let s = MetaStore::open(&d.path().join("meta.redb")).await.unwrap();
    s.apply(Command::CreateBucket {
        bucket: "b".into(),
        now: 1,
    })
    .await
    .unwrap();
    (d, s)
}

async fn put(s: &MetaStore, key: &str, rec: ObjectRecord, cond: WriteCondition) -> Result<Outcome> {
    s.apply(Command::PutObject {
        bucket: "b".into(),
        key: key.into(),
        record: rec,
        cond,
    })
    .await
}

#[tokio::test]
async fn buckets_and_errors() {
    let (_d, s) = store().await;
    let e = s
        .apply(Command::CreateBucket {
            bucket: "b".into(),
            now: 2,
        })
        .await;
    assert!(matches!(e, Err(MetaError::BucketAlreadyOwnedByYou)));
    put(&s, "k", obj("e1", &[]), WriteCondition::None)
        .await
        .unwrap();
    let e = s
        .apply(Command::DeleteBucket {
            bucket: "b".into(),
            now: 3,
        })
        .await;
    assert!(matches!(e, Err(MetaError::BucketNotEmpty)));
    s.apply(Command::DeleteObject {
        bucket: "b".into(),
        key: "k".into(),
        now: 3,
    })
    .await
    .unwrap();
    s.apply(Command::DeleteBucket {
        bucket: "b".into(),
        now: 3,
    })
    .await
    .unwrap();
    assert!(matches!(
        s.object("b", "k").await,
        Err(MetaError::NoSuchBucket)
    ));
    let e = put(&s, "k", obj("e1", &[]), WriteCondition::None).await;
    assert!(matches!(e, Err(MetaError::NoSuchBucket)));
}

#[tokio::test]
async fn conditional_puts() {
    let (_d, s) = store().await;
    put(&s, "k", obj("e1", &[]), WriteCondition::IfAbsent)
        .await
        .unwrap();
    let e = put(&s, "k", obj("e2", &[]), WriteCondition::IfAbsent).await;
    assert!(matches!(e, Err(MetaError::PreconditionFailed)));
    let e = put(
        &s,
        "k",
        obj("e2", &[]),
        WriteCondition::IfMatch("zz".into()),
    )
    .await;
    assert!(matches!(e, Err(MetaError::PreconditionFailed)));
    put(
        &s,
        "k",
        obj("e2", &[]),
        WriteCondition::IfMatch("e1".into()),
    )
    .await
    .unwrap();
    assert_eq!(s.object("b", "k").await.unwrap().unwrap().etag, "e2");
    let e = put(
        &s,
        "nope",
        obj("e2", &[]),
        WriteCondition::IfMatch("e1".into()),
    )
    .await;
    assert!(matches!(e, Err(MetaError::NoSuchKey)));
}

#[tokio::test]
async fn concurrent_if_absent_has_one_winner() {
    let (_d, s) = store().await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            put(
                &s,
                "race",
                obj(&format!("e{i}"), &[]),
                WriteCondition::IfAbsent,
            )
            .await
            .is_ok()
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += t.await.unwrap() as usize;
    }
    assert_eq!(wins, 1);
}

#[tokio::test]
async fn listing_with_prefix_delimiter_and_pages() {
    let (_d, s) = store().await;
    for k in ["a/1", "a/2", "b", "c/x/1", "c/y", "d"] {
        put(&s, k, obj("e", &[]), WriteCondition::None)
            .await
            .unwrap();
    }
    let names = |p: &ListPage| {
        p.entries
            .iter()
            .map(|e| e.name().to_string())
            .collect::<Vec<_>>()
    };
    let q = ListQuery {
        delimiter: Some("/".into()),
        max: 1000,
        ..Default::default()
    };
    let p = s.list("b", q.clone()).await.unwrap();
    assert_eq!(names(&p), ["a/", "b", "c/", "d"]);
    assert!(!p.truncated);
    // Paging through rolled-up prefixes, two at a time.
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let p = s
            .list(
                "b",
                ListQuery {
                    start_after: after.clone(),
                    max: 2,
                    ..q.clone()
                },
            )
            .await
            .unwrap();
        all.extend(names(&p));
        if !p.truncated {
            break;
        }
        after = Some(p.entries.last().unwrap().name().to_string());
    }
    assert_eq!(all, ["a/", "b", "c/", "d"]);
    let p = s
        .list(
            "b",
            ListQuery {
                prefix: "c/".into(),
                ..q.clone()
            },
        )
        .await
        .unwrap();
    assert_eq!(names(&p), ["c/x/", "c/y"]);
    let p = s
        .list(
            "b",
            ListQuery {
                prefix: "a".into(),
                max: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(names(&p), ["a/1", "a/2"]);
    let p = s
        .list(
            "b",
            ListQuery {
                start_after: Some("b".into()),
                max: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(names(&p), ["c/x/1", "c/y", "d"]);
}

#[tokio::test]
async fn multipart_complete_and_refcounts() {
    let (_d, s) = store().await;
    s.apply(Command::CreateUpload {
        bucket: "b".into(),
        key: "big".into(),
        upload_id: "u1".into(),
        record: UploadRecord {
            initiated: 5,
            headers: Default::default(),
            checksum_algorithm: None,
        },
    })
    .await
    .unwrap();
    for (n, data) in [(1u32, b"one".as_slice()), (2, b"two"), (3, b"three")] {
        let rec = obj(&format!("p{n}"), &[data]);
        s.apply(Command::PutPart {
            bucket: "b".into(),
            key: "big".into(),
            upload_id: "u1".into(),
            part_number: n,
            record: PartRecord {
                size: 3,
                etag: rec.etag.clone(),
                last_modified: 6,
                checksums: Default::default(),
                data: rec.data,
            },
        })
        .await
        .unwrap();
    }
    let bad = s
        .apply(Command::CompleteUpload {
            bucket: "b".into(),
            key: "big".into(),
            upload_id: "u1".into(),
            parts: vec![(1, "p1".into()), (2, "wrong".into())],
            record: obj("m-2", &[]),
            cond: WriteCondition::None,
        })
        .await;
    assert!(matches!(bad, Err(MetaError::InvalidPart(2))));
    s.apply(Command::CompleteUpload {
        bucket: "b".into(),
        key: "big".into(),
        upload_id: "u1".into(),
        parts: vec![(1, "p1".into()), (3, "p3".into())],
        record: obj("m-2", &[]),
        cond: WriteCondition::None,
    })
    .await
    .unwrap();
    let o = s.object("b", "big").await.unwrap().unwrap();
    assert_eq!(o.data.blocks().len(), 2);
    assert_eq!(s.refcount_blocking(&BlockHash::of(b"one")).unwrap(), 1);
    assert_eq!(s.refcount_blocking(&BlockHash::of(b"two")).unwrap(), 0);
    let gc = s.gc_candidates(i64::MAX, 100).await.unwrap();
    assert_eq!(gc.len(), 1);
    assert_eq!(gc[0].0, BlockHash::of(b"two"));
    assert!(matches!(
        s.upload("b", "big", "u1").await,
        Err(MetaError::NoSuchUpload)
    ));
    s.apply(Command::DeleteObject {
        bucket: "b".into(),
        key: "big".into(),
        now: 9,
    })
    .await
    .unwrap();
    assert_eq!(s.gc_candidates(i64::MAX, 100).await.unwrap().len(), 3);
    s.apply(Command::GcForget {
        entries: s.gc_candidates(i64::MAX, 100).await.unwrap(),
    })
    .await
    .unwrap();
    assert!(s.gc_candidates(i64::MAX, 100).await.unwrap().is_empty());
}

#[tokio::test]
async fn data_survives_reopen() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("meta.redb");
    {
        let s = MetaStore::open(&path).await.unwrap();
        s.apply(Command::CreateBucket {
            bucket: "b".into(),
            now: 1,
        })
        .await
        .unwrap();
        put(&s, "k", obj("e1", &[]), WriteCondition::None)
            .await
            .unwrap();
    }
    // The store's threads hold the database until they end.
    let mut tries = 0;
    let s = loop {
        match MetaStore::open(&path).await {
            Ok(s) => break s,
            Err(_) if tries < 200 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(s.object("b", "k").await.unwrap().unwrap().etag, "e1");
}

/// Listing agrees with a plain model of S3's semantics (prefix, delimiter, paging by
/// the last name returned) on random key sets.
#[test]
fn listing_matches_a_model() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let config = ProptestConfig {
        cases: 40,
        ..ProptestConfig::default()
    };
    proptest!(config, |(keys in proptest::collection::btree_set("[ab/é]{1,5}", 1..30),
                        prefix in "[ab/]{0,2}",
                        delim in proptest::option::of(Just("/".to_string())),
                        page in 1usize..5)| {
        rt.block_on(async {
            let (_d, s) = store().await;
            for k in &keys {
                put(&s, k, obj("e", &[]), WriteCondition::None).await.unwrap();
            }
            // The model: every key under the prefix, rolled up at the delimiter.
            let mut want: Vec<String> = Vec::new();
            for k in keys.iter().filter(|k| k.starts_with(&prefix)) {
                let name = match &delim {
                    Some(d) => match k[prefix.len()..].find(d.as_str()) {
                        Some(i) => k[..prefix.len() + i + d.len()].to_string(),
                        None => k.clone(),
                    },
                    None => k.clone(),
                };
                if want.last() != Some(&name) {
                    want.push(name);
                }
            }
            let mut got = Vec::new();
            let mut after = None;
            for _ in 0..100 {
                let p = s
                    .list("b", ListQuery { prefix: prefix.clone(), delimiter: delim.clone(), start_after: after.clone(), max: page })
                    .await
                    .unwrap();
                assert!(p.entries.len() <= page);
                got.extend(p.entries.iter().map(|e| e.name().to_string()));
                if !p.truncated {
                    break;
                }
                after = p.entries.last().map(|e| e.name().to_string());
            }
            assert_eq!(got, want);
        });
    });
}

/// Reads (served from the record cache or from redb) never go back in time: a read
/// that starts after a write was acknowledged sees it or something newer, and one
/// reader never sees an older version after a newer one. Overwrites and deletes race
/// with the readers filling the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_never_go_back_in_time() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    // Operation v (1, 2, ...) writes version v; those with v % 10 == 1 are deletes.
    let is_delete = |v: u64| v % 10 == 1;
    let next_delete_after = move |v: u64| (v + 1..).find(|&d| is_delete(d)).unwrap();
    let (_d, s) = store().await;
    let started = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (s, started, acked, done) = (s.clone(), started.clone(), acked.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let (mut last, mut reads) = (0u64, 0u64);
            while !done.load(Ordering::Acquire) {
                let floor = acked.load(Ordering::Acquire);
                let read = s.object("b", "k").await.unwrap();
                let now_started = started.load(Ordering::Acquire);
                match read {
                    Some(r) => {
                        let v: u64 = r.etag.parse().unwrap();
                        assert!(v >= floor, "read {v} after {floor} was acknowledged");
                        assert!(v >= last, "read {v} after having read {last}");
                        last = v;
                    }
                    None => {
                        // Absent: a delete newer than everything seen must have begun.
                        let d = next_delete_after(last.max(floor.saturating_sub(1)));
                        assert!(
                            floor == 0 || is_delete(floor) || d <= now_started,
                            "read nothing after version {} was acknowledged",
                            last.max(floor)
                        );
                        if last > 0 {
                            assert!(d <= now_started, "read nothing after having read {last}");
                        }
                    }
                }
                reads += 1;
                // As a server's request handlers do (each waits on its connection):
                // a reader that never yields would starve the Raft tasks.
                tokio::task::yield_now().await;
            }
            reads
        }));
    }
    for v in 1..=1000u64 {
        started.store(v, Ordering::Release);
        if is_delete(v) {
            s.apply(Command::DeleteObject {
                bucket: "b".into(),
                key: "k".into(),
                now: 1,
            })
            .await
            .unwrap();
        } else {
            put(&s, "k", obj(&v.to_string(), &[]), WriteCondition::None)
                .await
                .unwrap();
        }
        acked.store(v, Ordering::Release);
    }
    done.store(true, Ordering::Release);
    for r in readers {
        assert!(r.await.unwrap() > 0);
    }
}
