//! Every S3 operation cairn serves, and each error it promises, through aws-sdk-s3
//! against a real `cairn serve` process.

mod common;

use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, Delete, MetadataDirective, ObjectIdentifier,
};
use common::*;

async fn body(out: aws_sdk_s3::operation::get_object::GetObjectOutput) -> Vec<u8> {
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets() {
    let srv = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("alpha").send().await.unwrap();
    s3.create_bucket().bucket("beta-1").send().await.unwrap();

    let e = s3.create_bucket().bucket("alpha").send().await.unwrap_err();
    assert_eq!(err_of(&e), ("BucketAlreadyOwnedByYou".into(), 409));
    for bad in ["ab", "Upper", "under_score", "-dash", "a..b", "192.168.1.1"] {
        let e = s3.create_bucket().bucket(bad).send().await.unwrap_err();
        assert_eq!(err_of(&e), ("InvalidBucketName".into(), 400), "{bad}");
    }

    let names: Vec<String> = s3
        .list_buckets()
        .send()
        .await
        .unwrap()
        .buckets()
        .iter()
        .map(|b| b.name().unwrap().to_string())
        .collect();
    assert_eq!(names, ["alpha", "beta-1"]);

    s3.head_bucket().bucket("alpha").send().await.unwrap();
    let e = s3
        .head_bucket()
        .bucket("nope-nope")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e).1, 404);
    let loc = s3
        .get_bucket_location()
        .bucket("alpha")
        .send()
        .await
        .unwrap();
    assert!(
        loc.location_constraint()
            .is_none_or(|c| c.as_str().is_empty())
    );
    let e = s3
        .get_bucket_location()
        .bucket("nope-nope")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("NoSuchBucket".into(), 404));

    s3.put_object()
        .bucket("alpha")
        .key("k")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap();
    let e = s3.delete_bucket().bucket("alpha").send().await.unwrap_err();
    assert_eq!(err_of(&e), ("BucketNotEmpty".into(), 409));
    s3.delete_object()
        .bucket("alpha")
        .key("k")
        .send()
        .await
        .unwrap();
    s3.delete_bucket().bucket("alpha").send().await.unwrap();
    let e = s3.delete_bucket().bucket("alpha").send().await.unwrap_err();
    assert_eq!(err_of(&e), ("NoSuchBucket".into(), 404));
    let e = s3
        .put_object()
        .bucket("alpha")
        .key("k")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("NoSuchBucket".into(), 404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_and_headers() {
    let srv = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("bkt").send().await.unwrap();
    for (key, size) in [
        ("empty", 0usize),
        ("small", 100),
        ("inline-edge", 8 << 10),
        ("blocks", (9 << 20) + 7),
    ] {
        let data = bytes(size, size as u64);
        let put = s3
            .put_object()
            .bucket("bkt")
            .key(key)
            .content_type("video/mp4")
            .cache_control("max-age=3600")
            .content_disposition("attachment; filename=\"a.mp4\"")
            .content_encoding("identity")
            .content_language("en")
            .metadata("owner", "ada")
            .metadata("plays", "42")
            .body(ByteStream::from(data.clone()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            put.e_tag().unwrap(),
            format!("\"{}\"", md5_hex(&data)),
            "{key}"
        );
        let got = s3.get_object().bucket("bkt").key(key).send().await.unwrap();
        assert_eq!(got.content_type(), Some("video/mp4"));
        assert_eq!(got.cache_control(), Some("max-age=3600"));
        assert_eq!(
            got.content_disposition(),
            Some("attachment; filename=\"a.mp4\"")
        );
        assert_eq!(got.content_language(), Some("en"));
        assert_eq!(got.content_length(), Some(size as i64));
        let meta = got.metadata().unwrap();
        assert_eq!(meta.get("owner").map(String::as_str), Some("ada"));
        assert_eq!(meta.get("plays").map(String::as_str), Some("42"));
        assert_eq!(body(got).await, data, "{key}");
        let head = s3
            .head_object()
            .bucket("bkt")
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_length(), Some(size as i64));
        assert_eq!(head.e_tag().unwrap(), format!("\"{}\"", md5_hex(&data)));
    }
    // Response header overrides.
    let got = s3
        .get_object()
        .bucket("bkt")
        .key("small")
        .response_content_type("text/plain")
        .response_content_disposition("inline")
        .send()
        .await
        .unwrap();
    assert_eq!(got.content_type(), Some("text/plain"));
    assert_eq!(got.content_disposition(), Some("inline"));

    let e = s3
        .get_object()
        .bucket("bkt")
        .key("missing")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("NoSuchKey".into(), 404));
    let e = s3
        .head_object()
        .bucket("bkt")
        .key("missing")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e).1, 404);
    let e = s3
        .get_object()
        .bucket("nope-nope")
        .key("k")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("NoSuchBucket".into(), 404));

    // Overwrite, then delete; deleting an absent key succeeds as in S3.
    s3.put_object()
        .bucket("bkt")
        .key("small")
        .body(ByteStream::from_static(b"new"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        body(
            s3.get_object()
                .bucket("bkt")
                .key("small")
                .send()
                .await
                .unwrap()
        )
        .await,
        b"new"
    );
    s3.delete_object()
        .bucket("bkt")
        .key("small")
        .send()
        .await
        .unwrap();
    s3.delete_object()
        .bucket("bkt")
        .key("small")
        .send()
        .await
        .unwrap();
    let e = s3
        .get_object()
        .bucket("bkt")
        .key("small")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e).0, "NoSuchKey");

    // Limits: key length.
    let long = "k".repeat(1025);
    let e = s3
        .put_object()
        .bucket("bkt")
        .key(&long)
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("KeyTooLongError".into(), 400));
    s3.put_object()
        .bucket("bkt")
        .key("k".repeat(1024))
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap();
    // Limits: user metadata.
    let e = s3
        .put_object()
        .bucket("bkt")
        .key("meta")
        .metadata("big", "v".repeat(3000))
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("MetadataTooLarge".into(), 400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges() {
    let srv = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("bkt").send().await.unwrap();
    let data = bytes((9 << 20) + 123, 7);
    s3.put_object()
        .bucket("bkt")
        .key("r")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();
    let n = data.len();
    for (spec, lo, hi) in [
        ("bytes=0-0".to_string(), 0, 0),
        ("bytes=100-200".to_string(), 100, 200),
        (
            format!("bytes={}-{}", (4 << 20) - 5, (4 << 20) + 5),
            (4 << 20) - 5,
            (4 << 20) + 5,
        ),
        (format!("bytes={}-", n - 10), n - 10, n - 1),
        ("bytes=-17".to_string(), n - 17, n - 1),
        (format!("bytes=5-{}", n + 1000), 5, n - 1),
    ] {
        let got = s3
            .get_object()
            .bucket("bkt")
            .key("r")
            .range(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(got.content_range().unwrap(), format!("bytes {lo}-{hi}/{n}"));
        assert_eq!(body(got).await, data[lo..=hi], "{spec}");
    }
    let e = s3
        .get_object()
        .bucket("bkt")
        .key("r")
        .range(format!("bytes={n}-"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("InvalidRange".into(), 416));
    // An inline object too.
    s3.put_object()
        .bucket("bkt")
        .key("s")
        .body(ByteStream::from_static(b"0123456789"))
        .send()
        .await
        .unwrap();
    let got = s3
        .get_object()
        .bucket("bkt")
        .key("s")
        .range("bytes=2-4")
        .send()
        .await
        .unwrap();
    assert_eq!(body(got).await, b"234");
    let e = s3
        .get_object()
        .bucket("bkt")
        .key("s")
        .range("bytes=10-12")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("InvalidRange".into(), 416));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests() {
    let srv = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("bkt").send().await.unwrap();
    let put = s3
        .put_object()
        .bucket("bkt")
        .key("c")
        .if_none_match("*")
        .body(ByteStream::from_static(b"v1"))
        .send()
        .await
        .unwrap();
    let etag1 = put.e_tag().unwrap().to_string();
    let e = s3
        .put_object()
        .bucket("bkt")
        .key("c")
        .if_none_match("*")
        .body(ByteStream::from_static(b"v2"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("PreconditionFailed".into(), 412));
    let e = s3
        .put_object()
        .bucket("bkt")
        .key("c")
        .if_match("\"0123\"")
        .body(ByteStream::from_static(b"v2"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("PreconditionFailed".into(), 412));
    let put2 = s3
        .put_object()
        .bucket("bkt")
        .key("c")
        .if_match(&etag1)
        .body(ByteStream::from_static(b"v2"))
        .send()
        .await
        .unwrap();
    let etag2 = put2.e_tag().unwrap().to_string();
    assert_eq!(
        body(s3.get_object().bucket("bkt").key("c").send().await.unwrap()).await,
        b"v2"
    );
    let e = s3
        .put_object()
        .bucket("bkt")
        .key("absent")
        .if_match(&etag1)
        .body(ByteStream::from_static(b"v"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("NoSuchKey".into(), 404));

    // GET conditions.
    let got = s3
        .get_object()
        .bucket("bkt")
        .key("c")
        .if_match(&etag2)
        .send()
        .await
        .unwrap();
    assert_eq!(body(got).await, b"v2");
    let e = s3
        .get_object()
        .bucket("bkt")
        .key("c")
        .if_match(&etag1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("PreconditionFailed".into(), 412));
    let e = s3
        .get_object()
        .bucket("bkt")
        .key("c")
        .if_none_match(&etag2)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e).1, 304);
    s3.get_object()
        .bucket("bkt")
        .key("c")
        .if_none_match(&etag1)
        .send()
        .await
        .unwrap();
    let past = DateTime::from_secs(1_000_000_000);
    let future = DateTime::from_secs(4_000_000_000);
    let e = s3
        .get_object()
        .bucket("bkt")
        .key("c")
        .if_modified_since(future)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e).1, 304);
    s3.get_object()
        .bucket("bkt")
        .key("c")
        .if_modified_since(past)
        .send()
        .await
        .unwrap();
    let e = s3
        .get_object()
        .bucket("bkt")
        .key("c")
        .if_unmodified_since(past)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("PreconditionFailed".into(), 412));
    s3.get_object()
        .bucket("bkt")
        .key("c")
        .if_unmodified_since(future)
        .send()
        .await
        .unwrap();
    let e = s3
        .head_object()
        .bucket("bkt")
        .key("c")
        .if_match(&etag1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e).1, 412);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_delete_objects() {
    let srv = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("src").send().await.unwrap();
    s3.create_bucket().bucket("dst").send().await.unwrap();
    let data = bytes(6 << 20, 3);
    s3.put_object()
        .bucket("src")
        .key("a")
        .content_type("image/png")
        .metadata("m", "1")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();
    let c = s3
        .copy_object()
        .bucket("dst")
        .key("copy")
        .copy_source("src/a")
        .send()
        .await
        .unwrap();
    assert_eq!(
        c.copy_object_result().unwrap().e_tag().unwrap(),
        format!("\"{}\"", md5_hex(&data))
    );
    let got = s3
        .get_object()
        .bucket("dst")
        .key("copy")
        .send()
        .await
        .unwrap();
    assert_eq!(got.content_type(), Some("image/png"));
    assert_eq!(
        got.metadata().unwrap().get("m").map(String::as_str),
        Some("1")
    );
    assert_eq!(body(got).await, data);
    s3.copy_object()
        .bucket("dst")
        .key("replaced")
        .copy_source("src/a")
        .metadata_directive(MetadataDirective::Replace)
        .content_type("text/plain")
        .metadata("n", "2")
        .send()
        .await
        .unwrap();
    let got = s3
        .head_object()
        .bucket("dst")
        .key("replaced")
        .send()
        .await
        .unwrap();
    assert_eq!(got.content_type(), Some("text/plain"));
    assert!(got.metadata().unwrap().get("m").is_none());
    assert_eq!(
        got.metadata().unwrap().get("n").map(String::as_str),
        Some("2")
    );
    let e = s3
        .copy_object()
        .bucket("src")
        .key("a")
        .copy_source("src/a")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("InvalidRequest".into(), 400));
    let e = s3
        .copy_object()
        .bucket("dst")
        .key("x")
        .copy_source("src/none")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("NoSuchKey".into(), 404));
    // Deleting the source leaves the copy whole.
    s3.delete_object()
        .bucket("src")
        .key("a")
        .send()
        .await
        .unwrap();
    assert_eq!(
        body(
            s3.get_object()
                .bucket("dst")
                .key("copy")
                .send()
                .await
                .unwrap()
        )
        .await,
        data
    );

    for i in 0..5 {
        s3.put_object()
            .bucket("dst")
            .key(format!("d{i}"))
            .body(ByteStream::from_static(b"x"))
            .send()
            .await
            .unwrap();
    }
    let del = Delete::builder()
        .set_objects(Some(
            ["d0", "d1", "d2", "never-existed"]
                .iter()
                .map(|k| ObjectIdentifier::builder().key(*k).build().unwrap())
                .collect(),
        ))
        .build()
        .unwrap();
    let out = s3
        .delete_objects()
        .bucket("dst")
        .delete(del)
        .send()
        .await
        .unwrap();
    assert_eq!(out.deleted().len(), 4);
    assert!(out.errors().is_empty());
    let left: Vec<String> = s3
        .list_objects_v2()
        .bucket("dst")
        .prefix("d")
        .send()
        .await
        .unwrap()
        .contents()
        .iter()
        .map(|o| o.key().unwrap().to_string())
        .collect();
    assert_eq!(left, ["d3", "d4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings() {
    let srv = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("bkt").send().await.unwrap();
    let keys = ["a/1", "a/2", "a/b/3", "b", "c/x", "c/y/z", "d", "é/ü"];
    for k in keys {
        s3.put_object()
            .bucket("bkt")
            .key(k)
            .body(ByteStream::from_static(b"xyz"))
            .send()
            .await
            .unwrap();
    }
    // V2 with paging by continuation token.
    let mut got = Vec::new();
    let mut token = None;
    loop {
        let out = s3
            .list_objects_v2()
            .bucket("bkt")
            .max_keys(3)
            .set_continuation_token(token.clone())
            .send()
            .await
            .unwrap();
        assert!(out.key_count().unwrap() <= 3);
        got.extend(out.contents().iter().map(|o| o.key().unwrap().to_string()));
        if !out.is_truncated().unwrap() {
            break;
        }
        token = out.next_continuation_token().map(str::to_string);
    }
    assert_eq!(got, keys);
    // Delimiter and prefix.
    let out = s3
        .list_objects_v2()
        .bucket("bkt")
        .delimiter("/")
        .send()
        .await
        .unwrap();
    let cps: Vec<&str> = out
        .common_prefixes()
        .iter()
        .map(|p| p.prefix().unwrap())
        .collect();
    assert_eq!(cps, ["a/", "c/", "é/"]);
    let objs: Vec<&str> = out.contents().iter().map(|o| o.key().unwrap()).collect();
    assert_eq!(objs, ["b", "d"]);
    let out = s3
        .list_objects_v2()
        .bucket("bkt")
        .prefix("a/")
        .delimiter("/")
        .send()
        .await
        .unwrap();
    let objs: Vec<&str> = out.contents().iter().map(|o| o.key().unwrap()).collect();
    assert_eq!(objs, ["a/1", "a/2"]);
    assert_eq!(out.common_prefixes()[0].prefix(), Some("a/b/"));
    // Start-after.
    let out = s3
        .list_objects_v2()
        .bucket("bkt")
        .start_after("c/x")
        .send()
        .await
        .unwrap();
    let objs: Vec<&str> = out.contents().iter().map(|o| o.key().unwrap()).collect();
    assert_eq!(objs, ["c/y/z", "d", "é/ü"]);
    // V1 with marker paging and delimiter.
    let mut seen = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = s3
            .list_objects()
            .bucket("bkt")
            .delimiter("/")
            .max_keys(2)
            .set_marker(marker.clone())
            .send()
            .await
            .unwrap();
        seen.extend(out.contents().iter().map(|o| o.key().unwrap().to_string()));
        seen.extend(
            out.common_prefixes()
                .iter()
                .map(|p| p.prefix().unwrap().to_string()),
        );
        if !out.is_truncated().unwrap() {
            break;
        }
        marker = out.next_marker().map(str::to_string);
        assert!(marker.is_some());
    }
    seen.sort();
    assert_eq!(seen, ["a/", "b", "c/", "d", "é/"]);
    let out = s3
        .list_objects()
        .bucket("bkt")
        .prefix("c")
        .send()
        .await
        .unwrap();
    assert_eq!(out.contents().len(), 2);
    assert_eq!(out.contents()[0].size(), Some(3));
    // Max-keys 0 and a missing bucket.
    let out = s3
        .list_objects_v2()
        .bucket("bkt")
        .max_keys(0)
        .send()
        .await
        .unwrap();
    assert!(out.contents().is_empty());
    let e = s3
        .list_objects_v2()
        .bucket("nope-nope")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("NoSuchBucket".into(), 404));
    // Unversioned bucket: versioning status absent, every version id "null".
    let v = s3
        .get_bucket_versioning()
        .bucket("bkt")
        .send()
        .await
        .unwrap();
    assert!(v.status().is_none());
    let out = s3
        .list_object_versions()
        .bucket("bkt")
        .prefix("a/")
        .send()
        .await
        .unwrap();
    assert_eq!(out.versions().len(), 3);
    assert!(
        out.versions()
            .iter()
            .all(|v| v.version_id() == Some("null") && v.is_latest() == Some(true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart() {
    let srv = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("bkt").send().await.unwrap();
    let up = s3
        .create_multipart_upload()
        .bucket("bkt")
        .key("mp")
        .content_type("video/webm")
        .metadata("title", "cat")
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap().to_string();
    let p1 = bytes(5 << 20, 1);
    let p2 = bytes(5 << 20, 2);
    let p3 = bytes(1234, 3);
    let mut etags = Vec::new();
    for (n, p) in [(1, &p1), (2, &p2), (3, &p3)] {
        let out = s3
            .upload_part()
            .bucket("bkt")
            .key("mp")
            .upload_id(&id)
            .part_number(n)
            .body(ByteStream::from(p.clone()))
            .send()
            .await
            .unwrap();
        assert_eq!(out.e_tag().unwrap(), format!("\"{}\"", md5_hex(p)));
        etags.push(out.e_tag().unwrap().to_string());
    }
    let parts = s3
        .list_parts()
        .bucket("bkt")
        .key("mp")
        .upload_id(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        parts
            .parts()
            .iter()
            .map(|p| p.part_number().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(parts.parts()[2].size(), Some(1234));
    let page = s3
        .list_parts()
        .bucket("bkt")
        .key("mp")
        .upload_id(&id)
        .max_parts(2)
        .send()
        .await
        .unwrap();
    assert_eq!(page.parts().len(), 2);
    assert_eq!(page.is_truncated(), Some(true));
    let ups = s3
        .list_multipart_uploads()
        .bucket("bkt")
        .send()
        .await
        .unwrap();
    assert_eq!(ups.uploads().len(), 1);
    assert_eq!(ups.uploads()[0].key(), Some("mp"));

    let part = |n: i32, e: &str| CompletedPart::builder().part_number(n).e_tag(e).build();
    let complete = |parts: Vec<CompletedPart>| {
        s3.complete_multipart_upload()
            .bucket("bkt")
            .key("mp")
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
    };
    let e = complete(vec![part(2, &etags[1]), part(1, &etags[0])])
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("InvalidPartOrder".into(), 400));
    let e = complete(vec![
        part(1, &etags[0]),
        part(2, "\"00000000000000000000000000000000\""),
    ])
    .await
    .unwrap_err();
    assert_eq!(err_of(&e), ("InvalidPart".into(), 400));
    let e = complete(vec![part(1, &etags[0]), part(9, &etags[0])])
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("InvalidPart".into(), 400));

    let done = complete(vec![
        part(1, &etags[0]),
        part(2, &etags[1]),
        part(3, &etags[2]),
    ])
    .await
    .unwrap();
    // md5 of the concatenated binary part MD5s, then -N.
    let mut cat = Vec::new();
    for p in [&p1, &p2, &p3] {
        cat.extend(hex_decode(&md5_hex(p)));
    }
    assert_eq!(done.e_tag().unwrap(), format!("\"{}-3\"", md5_hex(&cat)));
    let got = s3
        .get_object()
        .bucket("bkt")
        .key("mp")
        .send()
        .await
        .unwrap();
    assert_eq!(got.content_type(), Some("video/webm"));
    assert_eq!(
        got.metadata().unwrap().get("title").map(String::as_str),
        Some("cat")
    );
    let all = body(got).await;
    assert_eq!(all.len(), p1.len() + p2.len() + p3.len());
    assert!(
        all[..p1.len()] == p1[..]
            && all[p1.len()..p1.len() + p2.len()] == p2[..]
            && all[p1.len() + p2.len()..] == p3[..]
    );
    let e = s3
        .list_parts()
        .bucket("bkt")
        .key("mp")
        .upload_id(&id)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("NoSuchUpload".into(), 404));

    // EntityTooSmall: a part but the last under 5 MiB.
    let up = s3
        .create_multipart_upload()
        .bucket("bkt")
        .key("small")
        .send()
        .await
        .unwrap();
    let id2 = up.upload_id().unwrap();
    let mut es = Vec::new();
    for n in 1..=2 {
        let out = s3
            .upload_part()
            .bucket("bkt")
            .key("small")
            .upload_id(id2)
            .part_number(n)
            .body(ByteStream::from_static(b"tiny"))
            .send()
            .await
            .unwrap();
        es.push(
            CompletedPart::builder()
                .part_number(n)
                .e_tag(out.e_tag().unwrap())
                .build(),
        );
    }
    let e = s3
        .complete_multipart_upload()
        .bucket("bkt")
        .key("small")
        .upload_id(id2)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(es))
                .build(),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("EntityTooSmall".into(), 400));
    let e = s3
        .upload_part()
        .bucket("bkt")
        .key("small")
        .upload_id(id2)
        .part_number(10001)
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e).1, 400);
    s3.abort_multipart_upload()
        .bucket("bkt")
        .key("small")
        .upload_id(id2)
        .send()
        .await
        .unwrap();
    let e = s3
        .abort_multipart_upload()
        .bucket("bkt")
        .key("small")
        .upload_id(id2)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("NoSuchUpload".into(), 404));
    let e = s3
        .upload_part()
        .bucket("bkt")
        .key("small")
        .upload_id("nonexistent")
        .part_number(1)
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("NoSuchUpload".into(), 404));

    // UploadPartCopy, whole and ranged.
    let up = s3
        .create_multipart_upload()
        .bucket("bkt")
        .key("pc")
        .send()
        .await
        .unwrap();
    let id3 = up.upload_id().unwrap();
    let c1 = s3
        .upload_part_copy()
        .bucket("bkt")
        .key("pc")
        .upload_id(id3)
        .part_number(1)
        .copy_source("bkt/mp")
        .copy_source_range(format!("bytes=0-{}", (5 << 20) - 1))
        .send()
        .await
        .unwrap();
    let c2 = s3
        .upload_part_copy()
        .bucket("bkt")
        .key("pc")
        .upload_id(id3)
        .part_number(2)
        .copy_source("bkt/mp")
        .copy_source_range(format!("bytes={}-{}", 5 << 20, (5 << 20) + 99))
        .send()
        .await
        .unwrap();
    let parts = vec![
        CompletedPart::builder()
            .part_number(1)
            .e_tag(c1.copy_part_result().unwrap().e_tag().unwrap())
            .build(),
        CompletedPart::builder()
            .part_number(2)
            .e_tag(c2.copy_part_result().unwrap().e_tag().unwrap())
            .build(),
    ];
    s3.complete_multipart_upload()
        .bucket("bkt")
        .key("pc")
        .upload_id(id3)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .unwrap();
    let got = body(
        s3.get_object()
            .bucket("bkt")
            .key("pc")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got, all[..(5 << 20) + 100]);
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_digests() {
    let srv = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("bkt").send().await.unwrap();
    let wrong_secret = client_for(
        &srv.endpoint,
        ACCESS_KEY,
        "not-the-secret-key-at-all-000000000000",
    );
    let e = wrong_secret.list_buckets().send().await.unwrap_err();
    assert_eq!(err_of(&e), ("SignatureDoesNotMatch".into(), 403));
    let unknown = client_for(&srv.endpoint, "CRNUNKNOWNKEY0000000", SECRET_KEY);
    let e = unknown.list_buckets().send().await.unwrap_err();
    assert_eq!(err_of(&e), ("InvalidAccessKeyId".into(), 403));

    // Content-MD5 and x-amz-checksum-* are verified.
    let e = s3
        .put_object()
        .bucket("bkt")
        .key("md5")
        .content_md5("AAAAAAAAAAAAAAAAAAAAAA==")
        .body(ByteStream::from_static(b"payload"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("BadDigest".into(), 400));
    let e = s3
        .put_object()
        .bucket("bkt")
        .key("crc")
        .checksum_crc32("AAAAAA==")
        .body(ByteStream::from_static(b"payload"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("BadDigest".into(), 400));
    let e = s3
        .put_object()
        .bucket("bkt")
        .key("sha")
        .checksum_sha256("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")
        .body(ByteStream::from_static(b"payload"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("BadDigest".into(), 400));
    // Nothing was stored by the failed writes.
    let out = s3.list_objects_v2().bucket("bkt").send().await.unwrap();
    assert!(out.contents().is_empty());
    // The SDK's own default (CRC32 in a trailer of an aws-chunked body) is accepted.
    let data = bytes(3 << 20, 9);
    s3.put_object()
        .bucket("bkt")
        .key("ok")
        .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32C)
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();
    let got = s3
        .get_object()
        .bucket("bkt")
        .key("ok")
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert!(got.checksum_crc32_c().is_some());
    assert_eq!(body(got).await, data);
}
