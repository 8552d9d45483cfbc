"""boto3, newest version, default settings (checksums, multipart threshold and
concurrency) against a real cairn process."""

import hashlib
import os
import re
import urllib.request

import botocore
import pytest


def test_upload_file_download_file_50mib(s3, bucket, tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(50 << 20)
    src.write_bytes(data)
    s3.upload_file(str(src), bucket, "big/file.bin")
    head = s3.head_object(Bucket=bucket, Key="big/file.bin")
    assert head["ContentLength"] == len(data)
    # boto3's default threshold is 8 MiB: this went up as multipart.
    assert head["ETag"].strip('"').endswith("-7")
    dst = tmp_path / "dst.bin"
    s3.download_file(bucket, "big/file.bin", str(dst))
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_put_get_with_metadata(s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"hello", ContentType="text/plain",
                  Metadata={"colour": "blue"}, CacheControl="max-age=60")
    r = s3.get_object(Bucket=bucket, Key="k")
    assert r["Body"].read() == b"hello"
    assert r["ContentType"] == "text/plain"
    assert r["Metadata"] == {"colour": "blue"}
    assert r["CacheControl"] == "max-age=60"
    assert r["ETag"] == '"%s"' % hashlib.md5(b"hello").hexdigest()


@pytest.mark.parametrize("signature_version", [None, "s3v4"])
def test_presigned_get(server, bucket, signature_version):
    s3 = server.client(signature_version=signature_version) if signature_version else server.client()
    s3.put_object(Bucket=bucket, Key="pre/signed.txt", Body=b"presigned body")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "pre/signed.txt"},
                                    ExpiresIn=300)
    if signature_version == "s3v4":
        assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url) as r:
        assert r.read() == b"presigned body"
    bad = re.sub(r"(Signature=)([^&]{4})", lambda m: m.group(1) + ("0000" if m.group(2) != "0000" else "1111"), url)
    assert bad != url
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad)
    assert e.value.code == 403
    assert b"SignatureDoesNotMatch" in e.value.read()


def test_ranged_get(s3, bucket):
    data = bytes(range(256)) * 40000  # ~10 MiB: spans several blocks
    s3.put_object(Bucket=bucket, Key="r", Body=data)
    for first, last in [(0, 0), (5, 1000), (4 << 20, (4 << 20) + 10), (len(data) - 7, len(data) - 1),
                        ((4 << 20) - 3, (8 << 20) + 3)]:
        r = s3.get_object(Bucket=bucket, Key="r", Range=f"bytes={first}-{last}")
        assert r["Body"].read() == data[first:last + 1]
        assert r["ContentRange"] == f"bytes {first}-{last}/{len(data)}"
    r = s3.get_object(Bucket=bucket, Key="r", Range="bytes=-10")
    assert r["Body"].read() == data[-10:]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.get_object(Bucket=bucket, Key="r", Range=f"bytes={len(data)}-")
    assert e.value.response["Error"]["Code"] == "InvalidRange"


def test_list_with_delimiter(s3, bucket):
    for k in ["a/1", "a/2", "b", "c/x/1", "c/y", "d"]:
        s3.put_object(Bucket=bucket, Key=k, Body=b"x")
    r = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [c["Key"] for c in r["Contents"]] == ["b", "d"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a/", "c/"]
    r = s3.list_objects_v2(Bucket=bucket, Delimiter="/", Prefix="c/")
    assert [c["Key"] for c in r["Contents"]] == ["c/y"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["c/x/"]
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
    keys = [c["Key"] for p in pages for c in p.get("Contents", [])]
    assert keys == ["a/1", "a/2", "b", "c/x/1", "c/y", "d"]
    pages = s3.get_paginator("list_objects").paginate(Bucket=bucket, Delimiter="/",
                                                       PaginationConfig={"PageSize": 1})
    seen = []
    for p in pages:
        seen += [c["Key"] for c in p.get("Contents", [])] + [x["Prefix"] for x in p.get("CommonPrefixes", [])]
    assert seen == ["a/", "b", "c/", "d"]


def test_multipart_abort(s3, bucket):
    up = s3.create_multipart_upload(Bucket=bucket, Key="m")
    s3.upload_part(Bucket=bucket, Key="m", UploadId=up["UploadId"], PartNumber=1, Body=b"x" * (5 << 20))
    ups = s3.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert [u["UploadId"] for u in ups] == [up["UploadId"]]
    s3.abort_multipart_upload(Bucket=bucket, Key="m", UploadId=up["UploadId"])
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.list_parts(Bucket=bucket, Key="m", UploadId=up["UploadId"])
    assert e.value.response["Error"]["Code"] == "NoSuchUpload"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.head_object(Bucket=bucket, Key="m")
    assert e.value.response["Error"]["Code"] == "404"


def test_errors_carry_request_id(s3, bucket):
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.get_object(Bucket=bucket, Key="missing")
    err = e.value.response
    assert err["Error"]["Code"] == "NoSuchKey"
    assert err["ResponseMetadata"]["RequestId"]
    assert err["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"] == err["ResponseMetadata"]["RequestId"]
