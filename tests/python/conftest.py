"""Starts a real `cairn serve` on ephemeral loopback ports for the boto3 tests."""

import os
import re
import signal
import shutil
import subprocess
import tempfile
import time
import uuid

import boto3
import pytest
from botocore.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("CAIRN_BIN", os.path.join(ROOT, "target", "release", "cairn"))

ACCESS_KEY = "CRNTESTPYTHONKEY0001"
SECRET_KEY = "python-test-secret-key-0123456789abcdef"


class Server:
    def __init__(self, data_dir, extra_args=(), env=None):
        self.data_dir = data_dir
        e = dict(os.environ)
        e.update({"CAIRN_ACCESS_KEY": ACCESS_KEY, "CAIRN_SECRET_KEY": SECRET_KEY, "RUST_LOG": "info"})
        if env:
            e.update(env)
        self.log = open(os.path.join(os.path.dirname(data_dir), "server.log"), "ab")
        self.proc = subprocess.Popen(
            [BINARY, "serve", "--data-dir", data_dir, "--s3-address", "127.0.0.1:0",
             "--admin-address", "127.0.0.1:0", *extra_args],
            stdout=subprocess.PIPE, stderr=self.log, env=e)
        self.endpoint = None
        self.admin = None
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError("cairn exited before serving; see server.log")
            m = re.match(r"S3 endpoint:\s+(\S+)", line)
            if m:
                self.endpoint = m.group(1)
            m = re.match(r"admin endpoint:\s+(\S+)", line)
            if m:
                self.admin = m.group(1)
            if line.strip() == "ready":
                break
        assert self.endpoint and self.admin

    def client(self, **cfg):
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **cfg))

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="session")
def server():
    d = tempfile.mkdtemp(prefix="cairn-py-")
    s = Server(os.path.join(d, "data"))
    yield s
    s.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def s3(server):
    return server.client()


@pytest.fixture
def bucket(s3):
    name = "py-" + uuid.uuid4().hex[:12]
    s3.create_bucket(Bucket=name)
    return name
