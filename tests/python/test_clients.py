"""Other real clients against cairn: virtual-hosted-style requests, the AWS CLI and
rclone (installed by ./test.sh; skipped with a reason where they are missing)."""

import hashlib
import os
import shutil
import subprocess
import tempfile

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from conftest import ACCESS_KEY, SECRET_KEY, Server
from test_bad_input import raw


@pytest.fixture(scope="module")
def vhost_server():
    d = tempfile.mkdtemp(prefix="cairn-vh-")
    s = Server(os.path.join(d, "data"), extra_args=["--base-domain", "s3.example.test"])
    yield s
    s.stop()
    shutil.rmtree(d, ignore_errors=True)


def signed_host(server, method, host, path, body=b""):
    port = server.endpoint.rsplit(":", 1)[1]
    url = f"http://{host}:{port}{path}"
    req = AWSRequest(method=method, url=url, data=body, headers={})
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(req)
    headers = dict(req.headers.items())
    headers["Host"] = f"{host}:{port}"
    return raw(server, method, path, body, headers)


def test_virtual_hosted_style(vhost_server):
    s3 = vhost_server.client()
    s3.create_bucket(Bucket="vhost-bucket")
    status, _ = signed_host(vhost_server, "PUT", "vhost-bucket.s3.example.test", "/dir/key.txt", b"via vhost")
    assert status == 200
    # Path-style still works on the same server and sees the same object.
    assert s3.get_object(Bucket="vhost-bucket", Key="dir/key.txt")["Body"].read() == b"via vhost"
    status, body = signed_host(vhost_server, "GET", "vhost-bucket.s3.example.test", "/dir/key.txt")
    assert (status, body) == (200, b"via vhost")
    status, body = signed_host(vhost_server, "GET", "vhost-bucket.s3.example.test", "/")
    assert status == 200 and b"<Key>dir/key.txt</Key>" in body
    status, body = signed_host(vhost_server, "GET", "no-such-bucket.s3.example.test", "/x")
    assert status == 404 and b"NoSuchBucket" in body
    # Any other host name is path-style, even one that looks like a domain.
    status, body = signed_host(vhost_server, "GET", "localhost", "/vhost-bucket/dir/key.txt")
    assert (status, body) == (200, b"via vhost")


def tool(name):
    path = shutil.which(name) or os.path.join(os.path.dirname(os.path.abspath(os.sys.executable)), name)
    return path if os.path.exists(path) else None


def test_aws_cli(server, tmp_path):
    aws = tool("aws")
    if not aws:
        pytest.skip("the AWS CLI is not installed (./test.sh installs it)")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
               AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1")
    run = lambda *a: subprocess.run([aws, "--endpoint-url", server.endpoint, *a], env=env,
                                    capture_output=True, text=True, timeout=300)
    r = run("s3", "mb", "s3://cli-bucket")
    assert r.returncode == 0, r.stderr
    src = tmp_path / "src"
    src.mkdir()
    files = {"a.txt": b"alpha", "sub/b.bin": os.urandom(20 << 20), "sub/deeper/c": b""}
    for name, data in files.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    r = run("s3", "sync", str(src), "s3://cli-bucket/tree")
    assert r.returncode == 0, r.stderr
    r = run("s3", "ls", "--recursive", "s3://cli-bucket/tree/")
    assert r.returncode == 0, r.stderr
    assert sorted(line.split()[-1] for line in r.stdout.splitlines()) == \
        sorted("tree/" + n for n in files)
    dst = tmp_path / "dst"
    r = run("s3", "cp", "--recursive", "s3://cli-bucket/tree", str(dst))
    assert r.returncode == 0, r.stderr
    for name, data in files.items():
        assert (dst / name).read_bytes() == data, name
    r = run("s3api", "head-object", "--bucket", "cli-bucket", "--key", "tree/a.txt")
    assert r.returncode == 0 and hashlib.md5(b"alpha").hexdigest() in r.stdout
    r = run("s3", "rm", "--recursive", "s3://cli-bucket/tree")
    assert r.returncode == 0, r.stderr
    r = run("s3", "rb", "s3://cli-bucket")
    assert r.returncode == 0, r.stderr


def test_rclone(server, tmp_path):
    rclone = tool("rclone")
    if not rclone:
        pytest.skip("rclone is not installed (./test.sh installs it)")
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env.update(RCLONE_CONFIG_CAIRN_TYPE="s3", RCLONE_CONFIG_CAIRN_PROVIDER="Other",
               RCLONE_CONFIG_CAIRN_ACCESS_KEY_ID=ACCESS_KEY, RCLONE_CONFIG_CAIRN_SECRET_ACCESS_KEY=SECRET_KEY,
               RCLONE_CONFIG_CAIRN_ENDPOINT=server.endpoint, RCLONE_CONFIG_CAIRN_REGION="us-east-1",
               RCLONE_CONFIG=str(tmp_path / "none.conf"))
    run = lambda *a: subprocess.run([rclone, *a], env=env, capture_output=True, text=True, timeout=300)
    src = tmp_path / "src"
    src.mkdir()
    data = {"one.txt": b"one", "two/three.bin": os.urandom(12 << 20)}
    for name, d in data.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(d)
    r = run("mkdir", "cairn:rclone-bucket")
    assert r.returncode == 0, r.stderr
    r = run("copy", str(src), "cairn:rclone-bucket/x")
    assert r.returncode == 0, r.stderr
    r = run("check", str(src), "cairn:rclone-bucket/x")
    assert r.returncode == 0, r.stderr
    dst = tmp_path / "dst"
    r = run("copy", "cairn:rclone-bucket/x", str(dst))
    assert r.returncode == 0, r.stderr
    for name, d in data.items():
        assert (dst / name).read_bytes() == d
    r = run("lsf", "-R", "cairn:rclone-bucket")
    assert r.returncode == 0 and "x/two/three.bin" in r.stdout, r.stdout + r.stderr
    r = run("purge", "cairn:rclone-bucket")
    assert r.returncode == 0, r.stderr
