"""Bad input gets a clear S3 error, changes nothing, and the server keeps serving."""

import http.client
import urllib.parse

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from conftest import ACCESS_KEY, SECRET_KEY


def signed(server, method, path, body=b"", headers=None, query="", secret=SECRET_KEY, region="us-east-1"):
    """Sends a SigV4-signed request with exactly this body; returns (status, body)."""
    url = server.endpoint + path + (("?" + query) if query else "")
    req = AWSRequest(method=method, url=url, data=body, headers=headers or {})
    S3SigV4Auth(Credentials(ACCESS_KEY, secret), "s3", region).add_auth(req)
    return raw(server, method, path + (("?" + query) if query else ""), body, dict(req.headers.items()))


def raw(server, method, target, body=b"", headers=None):
    u = urllib.parse.urlparse(server.endpoint)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    has_host = any(k.lower() == "host" for k in (headers or {}))
    c.putrequest(method, target, skip_host=has_host, skip_accept_encoding=True)
    for k, v in (headers or {}).items():
        c.putheader(k, v)
    if body and "Content-Length" not in (headers or {}):
        c.putheader("Content-Length", str(len(body)))
    c.endheaders(body)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def code_of(body):
    text = body.decode(errors="replace")
    assert "<RequestId>" in text, text
    return text.split("<Code>")[1].split("</Code>")[0]


def still_serving(s3, bucket):
    s3.put_object(Bucket=bucket, Key="alive", Body=b"yes")
    assert s3.get_object(Bucket=bucket, Key="alive")["Body"].read() == b"yes"


def test_malformed_xml(server, s3, bucket):
    up = s3.create_multipart_upload(Bucket=bucket, Key="m")["UploadId"]
    for body in [b"<CompleteMultipartUpload><Part>", b"not xml at all", b"\x00\xff\xfe" * 10]:
        status, resp = signed(server, "POST", f"/{bucket}/m", body, query=f"uploadId={up}")
        assert status == 400, resp
        assert code_of(resp) in ("MalformedXML", "InvalidRequest"), resp
    status, resp = signed(server, "POST", f"/{bucket}", b"<Delete><Object>", query="delete=")
    assert status == 400 and code_of(resp) in ("MalformedXML", "InvalidRequest"), resp
    # Nothing changed: the upload is still there, no object appeared.
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket)["Uploads"]] == [up]
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    still_serving(s3, bucket)


def test_wrong_signatures(server, s3, bucket):
    status, resp = signed(server, "PUT", f"/{bucket}/x", b"data", secret="wrong-secret-wrong-secret-wrong")
    assert status == 403 and code_of(resp) == "SignatureDoesNotMatch"
    # A signed request whose body was changed after signing.
    url = server.endpoint + f"/{bucket}/y"
    req = AWSRequest(method="PUT", url=url, data=b"original", headers={})
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(req)
    status, resp = raw(server, "PUT", f"/{bucket}/y", b"tampered", dict(req.headers.items()))
    assert status in (400, 403), resp
    assert code_of(resp) in ("XAmzContentSHA256Mismatch", "SignatureDoesNotMatch", "BadDigest"), resp
    # Signed for another region.
    status, resp = signed(server, "GET", f"/{bucket}", region="eu-west-1")
    assert status == 400 and code_of(resp) == "AuthorizationHeaderMalformed", resp
    # Garbage in the Authorization header; no auth at all.
    status, resp = raw(server, "GET", "/", headers={"Authorization": "AWS4-HMAC-SHA256 garbage"})
    assert status in (400, 403)
    code_of(resp)
    status, resp = raw(server, "GET", f"/{bucket}")
    assert status == 403 and code_of(resp) == "AccessDenied"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == []
    still_serving(s3, bucket)


def test_bad_bucket_names(server, s3):
    for name in ["ab", "UPPER", "bad_name", "-x-", "a" * 64, "x..y"]:
        status, resp = signed(server, "PUT", f"/{name}")
        assert status == 400 and code_of(resp) == "InvalidBucketName", (name, resp)
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert not any(n in names for n in ["ab", "UPPER"])


def test_oversized_headers(server, s3, bucket):
    status, resp = signed(server, "PUT", f"/{bucket}/big-header", b"x", headers={"x-amz-meta-huge": "v" * 20000})
    assert status == 400 and code_of(resp) == "RequestHeaderSectionTooLarge", resp
    status, resp = signed(server, "PUT", f"/{bucket}/meta", b"x", headers={"x-amz-meta-big": "v" * 3000})
    assert status == 400 and code_of(resp) == "MetadataTooLarge", resp
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    still_serving(s3, bucket)


def test_ranges_past_the_end(server, s3, bucket):
    s3.put_object(Bucket=bucket, Key="r", Body=b"0123456789")
    for rng in ["bytes=10-", "bytes=100-200", "bytes=11-12"]:
        status, resp = signed(server, "GET", f"/{bucket}/r", headers={"Range": rng})
        assert status == 416 and code_of(resp) == "InvalidRange", (rng, resp)
    # A range that starts inside and ends past the end is served up to the end.
    status, resp = signed(server, "GET", f"/{bucket}/r", headers={"Range": "bytes=8-100"})
    assert status == 206 and resp == b"89"
    still_serving(s3, bucket)


def test_bad_part_numbers_and_limits(server, s3, bucket):
    up = s3.create_multipart_upload(Bucket=bucket, Key="p")["UploadId"]
    for n in ["0", "10001", "-1"]:
        status, resp = signed(server, "PUT", f"/{bucket}/p", b"x", query=f"partNumber={n}&uploadId={up}")
        assert status == 400, (n, resp)
        code_of(resp)
    status, resp = signed(server, "GET", f"/{bucket}", query="list-type=2&max-keys=-5")
    assert status == 400
    code_of(resp)
    status, resp = signed(server, "GET", f"/{bucket}", query="list-type=2&continuation-token=%25%25%25")
    assert status == 400 and code_of(resp) == "InvalidArgument"
    still_serving(s3, bucket)


def test_object_too_large_is_refused_before_upload(server, s3, bucket):
    # A single PUT may carry at most 5 GiB; the claim alone is refused, nothing is read.
    status, resp = signed(server, "PUT", f"/{bucket}/huge", b"",
                          headers={"Content-Length": str(6 << 30), "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    assert status == 400 and code_of(resp) == "EntityTooLarge", resp
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    still_serving(s3, bucket)


def chunked_put(server, bucket, key, data, crc_b64):
    """PUT with an aws-chunked body and the CRC32 in a trailer, as newest SDKs send."""
    import binascii
    url = server.endpoint + f"/{bucket}/{key}"
    body = b"%x\r\n" % len(data) + data + b"\r\n0\r\n" + b"x-amz-checksum-crc32:" + crc_b64.encode() + b"\r\n\r\n"
    headers = {"Content-Encoding": "aws-chunked", "x-amz-trailer": "x-amz-checksum-crc32",
               "x-amz-decoded-content-length": str(len(data)), "Content-Length": str(len(body))}
    req = AWSRequest(method="PUT", url=url, data=body, headers=headers)
    req.context = {"checksum": {"request_algorithm": {"in": "trailer", "algorithm": "crc32"}}}
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(req)
    assert req.headers["X-Amz-Content-SHA256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    return raw(server, "PUT", f"/{bucket}/{key}", body, dict(req.headers.items()))


def test_trailing_checksum_is_verified(server, s3, bucket):
    import base64
    import zlib
    data = b"trailer checked " * 1000
    good = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    status, resp = chunked_put(server, bucket, "good", data, good)
    assert status == 200, resp
    assert s3.get_object(Bucket=bucket, Key="good")["Body"].read() == data
    bad = base64.b64encode((zlib.crc32(data) ^ 1).to_bytes(4, "big")).decode()
    status, resp = chunked_put(server, bucket, "bad", data, bad)
    assert status == 400 and code_of(resp) == "BadDigest", resp
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["good"]
    still_serving(s3, bucket)
