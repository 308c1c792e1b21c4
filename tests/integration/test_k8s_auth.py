"""k8s.Client logs in again when its token is rotated away: a real HTTP server on loopback that
accepts one token at a time and rotates it, and the operator's client in its own process,
configured by KUBECONFIG as in production (a plain token, or an exec plugin as on EKS/GKE)."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]

# Two creates in a row; the server rotates its token after the first.
CLIENT = textwrap.dedent(
    """
    import asyncio, logging
    from kubetune import k8s

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    async def main() -> None:
        client = k8s.Client()
        try:
            for name in ("first", "second"):
                obj = {"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": name, "namespace": "default"}}
                print(name, await client.create(obj), flush=True)
        finally:
            await client.close()

    asyncio.run(main())
    """
)

# An exec credential plugin: prints the token the "cloud" currently issues.
PLUGIN = textwrap.dedent(
    """
    import json, sys
    token = open(sys.argv[1]).read().strip()
    print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1",
                      "kind": "ExecCredential", "status": {"token": token}}))
    """
)


class RotatingServer:
    """Accepts ``Bearer <current>`` only; after each accepted request it issues a new token
    (writes it where the credentials come from) and refuses the old one with 401."""

    def __init__(self, issue: Path) -> None:
        self.issue = issue
        self.generation = 1
        self.seen: list[tuple[str, int]] = []
        self.issue_token()

    @property
    def current(self) -> str:
        return f"token-{self.generation}"

    def issue_token(self) -> None:
        self.issue.write_text(self.current + "\n")

    async def handle(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token != self.current:
            self.seen.append((token, 401))
            status = {"kind": "Status", "status": "Failure", "reason": "Unauthorized", "code": 401}
            return web.json_response(status, status=401)
        self.seen.append((token, 201))
        body = await request.json()
        self.generation += 1
        self.issue_token()
        return web.json_response(body, status=201)


def kubeconfig(server: str, user: dict[str, object]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server}}],
        "users": [{"name": "operator", "user": user}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "operator"}}],
        "current-context": "local",
    }


async def rotate_under_the_client(tmp_path: Path, via: str) -> tuple[int, str, RotatingServer]:
    token_file = tmp_path / "issued-token"
    server = RotatingServer(token_file)
    app = web.Application()
    app.router.add_post("/api/v1/namespaces/{namespace}/configmaps", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    config = tmp_path / "kubeconfig"

    def write_config() -> None:
        if via == "exec":
            plugin = tmp_path / "plugin.py"
            plugin.write_text(PLUGIN)
            user: dict[str, object] = {
                "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1beta1",
                    "command": sys.executable,
                    "args": [str(plugin), str(token_file)],
                    "interactiveMode": "Never",
                }
            }
        else:  # a kubeconfig rewritten with the new token (as a credential helper does)
            user = {"token": token_file.read_text().strip()}
        config.write_text(yaml.safe_dump(kubeconfig(f"http://127.0.0.1:{port}", user)))

    write_config()
    original_issue = server.issue_token

    def issue_and_rewrite() -> None:
        original_issue()
        write_config()

    server.issue_token = issue_and_rewrite  # type: ignore[method-assign]
    try:
        env = {
            **os.environ,
            "KUBECONFIG": str(config),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer-image")]),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        return process.returncode or 0, output.decode(), server
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("via", ["token", "exec"])
def test_the_client_logs_in_again_after_a_token_rotation(tmp_path: Path, via: str) -> None:
    code, output, server = asyncio.run(rotate_under_the_client(tmp_path, via))
    assert code == 0, output
    assert [line for line in output.splitlines() if line.startswith(("first", "second"))] == [
        "first True",
        "second True",
    ], output
    # The old token was refused once, then the client logged in again and got the new one.
    assert server.seen == [("token-1", 201), ("token-1", 401), ("token-2", 201)]
    assert "logging in to the API server again" in output


def test_expired_credentials_are_renewed_before_a_request() -> None:
    import kopf

    from kubetune import k8s

    logins = 0
    expired = datetime.now(UTC) - timedelta(minutes=1)

    async def login() -> kopf.ConnectionInfo:
        nonlocal logins
        logins += 1
        return kopf.ConnectionInfo(server="http://127.0.0.1:9", token="t", expiration=expired)

    async def twice() -> None:
        client = k8s.Client(login=login)
        await client._authenticated()
        await client._authenticated()

    asyncio.run(twice())
    assert logins == 2
