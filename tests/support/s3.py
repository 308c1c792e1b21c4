"""S3 helpers for tests: credentials in the environment, unique buckets, an auth-checking moto.

The shared ``s3_server`` fixture (tests/conftest.py) accepts any credentials. To test wrong
credentials, :func:`start_auth_server` runs a second moto server in a subprocess with
``INITIAL_NO_AUTH_ACTION_COUNT`` set: moto then checks every request's access key against its
IAM users and verifies the signature, so an unknown key gives InvalidAccessKeyId and a wrong
secret gives SignatureDoesNotMatch - as on AWS.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

REGION = "us-east-1"
# Fake but well-formed keys for the no-auth server.
TEST_KEY_ID = "AKIAKUBETUNETEST0000"
TEST_SECRET = "kubetune-test-secret-not-real"


def s3_env(
    monkeypatch: pytest.MonkeyPatch, key_id: str = TEST_KEY_ID, secret: str = TEST_SECRET
) -> None:
    """Credentials the way the operator passes them to the trainer (from the Secret), and no
    shared config files, so nothing on this machine leaks in."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def client(endpoint: str, key_id: str = TEST_KEY_ID, secret: str = TEST_SECRET) -> Any:
    """A plain boto3 S3 client, for setting up and checking test state."""
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )


def new_bucket(endpoint: str, key_id: str = TEST_KEY_ID, secret: str = TEST_SECRET) -> str:
    """Create a uniquely named bucket (the server lives for the whole session)."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    client(endpoint, key_id, secret).create_bucket(Bucket=name)
    return name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class AuthServer:
    endpoint: str
    key_id: str
    secret: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


# IAM calls the setup makes before auth is enforced: create_user, create_access_key,
# put_user_policy. Every later request must carry a valid key and signature.
_SETUP_CALLS = 3


def start_auth_server(actions: str | list[str] = "s3:*") -> AuthServer:
    """A moto server that enforces credentials, with one IAM user allowed `actions`."""
    import boto3

    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(_SETUP_CALLS))
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    iam = boto3.session.Session().client(
        "iam",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName="trainer")
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
    }
    iam.put_user_policy(UserName="trainer", PolicyName="p", PolicyDocument=json.dumps(policy))
    return AuthServer(endpoint, key["AccessKeyId"], key["SecretAccessKey"], process)
