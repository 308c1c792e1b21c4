"""The Argo CD health check (Lua), run by real Lua interpreters over Argo CD's test-case format.

Argo CD runs health scripts with gopher-lua, a Lua 5.1: the cases run on lupa's Lua 5.1 (the
same dialect) and on Debian's lua5.4 binary (a second, independent interpreter).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

from tests.support.crd_schema import cel_errors, schema_errors

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "deploy" / "argocd"
CHECK = ARGOCD / "kubetune.io" / "FineTuneJob"
SCRIPT = (CHECK / "health.lua").read_text()
CASES = yaml.safe_load((CHECK / "health_test.yaml").read_text())["tests"]
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended"}


def load(case: dict[str, Any]) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((CHECK / case["inputPath"]).read_text())
    return document


def _as_argo_numbers(value: Any) -> Any:
    # Argo CD decodes the object from JSON: every number reaches Lua as a float64.
    if isinstance(value, dict):
        return {k: _as_argo_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_argo_numbers(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def run_lua51(obj: dict[str, Any]) -> dict[str, str]:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(_as_argo_numbers(obj), recursive=True)
    result = lua.execute(SCRIPT)
    return {"status": result["status"], "message": result["message"]}


def _lua_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(float(value))
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(_lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"[{_lua_literal(k)}] = {_lua_literal(v)}" for k, v in value.items())
            + "}"
        )
    raise TypeError(f"cannot write {type(value).__name__} as Lua")


def run_lua54(obj: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    binary = shutil.which("lua5.4")
    assert binary, "lua5.4 not installed (see .ci/run)"
    program = tmp_path / "check.lua"
    program.write_text(
        f"obj = {_lua_literal(obj)}\n"
        f"local hs = (function()\n{SCRIPT}\nend)()\n"
        'io.write(hs.status, "\\n", hs.message)\n'
    )
    done = subprocess.run([binary, str(program)], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    status, message = done.stdout.split("\n", 1)
    return {"status": status, "message": message}


@pytest.mark.parametrize("case", CASES, ids=lambda c: Path(c["inputPath"]).stem)
def test_health_on_lua51_like_argocd(case: dict[str, Any]) -> None:
    assert run_lua51(load(case)) == case["healthStatus"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: Path(c["inputPath"]).stem)
def test_health_on_debian_lua54(case: dict[str, Any], tmp_path: Path) -> None:
    assert run_lua54(load(case), tmp_path) == case["healthStatus"]


def test_cases_cover_every_health_and_every_file() -> None:
    assert {c["healthStatus"]["status"] for c in CASES} == ARGO_STATUSES
    listed = {c["inputPath"] for c in CASES}
    on_disk = {f"testdata/{p.name}" for p in (CHECK / "testdata").glob("*.yaml")}
    assert listed == on_disk


@pytest.mark.parametrize("case", CASES, ids=lambda c: Path(c["inputPath"]).stem)
def test_case_inputs_are_objects_the_api_server_would_store(case: dict[str, Any]) -> None:
    document = load(case)
    assert schema_errors(document) == []
    assert cel_errors(document) == []


def test_stale_generation_wins_over_every_phase() -> None:
    # Table-driven beyond the files: whatever the phase, an unobserved spec is Progressing.
    base = load(next(c for c in CASES if c["inputPath"].endswith("/succeeded.yaml")))
    for phase in ("Pending", "Running", "Suspended", "Succeeded", "Failed"):
        obj = {**base, "metadata": {**base["metadata"], "generation": 5}}
        obj["status"] = {**base["status"], "phase": phase, "observedGeneration": 4}
        health = run_lua51(obj)
        assert health == {
            "status": "Progressing",
            "message": "Waiting for the operator to act on generation 5",
        }, phase
        obj["status"]["observedGeneration"] = 5
        assert run_lua51(obj)["status"] != "Progressing" or phase in ("Pending", "Running")


def test_argocd_cm_patch_embeds_the_same_script() -> None:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert patch["metadata"] == {
        "name": "argocd-cm",
        "namespace": "argocd",
        "labels": {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"},
    }
    key = "resource.customizations.health.kubetune.io_FineTuneJob"
    assert patch["data"][key] == SCRIPT, "argocd-cm-patch.yaml drifted from health.lua"


def test_a_broken_script_is_caught() -> None:
    # The harness can fail: a script that calls a Lua 5.3+ operator breaks on Lua 5.1.
    lua = lua51.LuaRuntime()
    with pytest.raises(lua51.LuaSyntaxError):
        lua.execute("local x = 7 // 2\nreturn x")
