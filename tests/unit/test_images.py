"""The images (which cannot be built on these machines), the Makefile and release versions.

What can be checked without a Docker daemon: the Dockerfiles install extras that exist, pin
versions that satisfy pyproject.toml, run as the non-root users the chart and the operator
expect, set the cache paths the operator mounts, and their entrypoints resolve here.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from kubetune import api, manifests, render, settings
from tests.support.dockerfile import (
    OPERATOR_DOCKERFILE,
    TRAINER_DOCKERFILE,
    args_of,
    env_of,
    exec_form,
    final_stage,
    instructions,
)

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VENV_BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)


OPERATOR = instructions(OPERATOR_DOCKERFILE)
TRAINER = instructions(TRAINER_DOCKERFILE)


def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((ROOT / "helm/kubetune/values.yaml").read_text())
    return values


def chart_pod_security() -> dict[str, Any]:
    deployment = (ROOT / "helm/kubetune/templates/deployment.yaml").read_text()
    uid = re.search(r"runAsUser: (\d+)", deployment)
    assert uid
    return {"runAsUser": int(uid.group(1))}


def quickstart_pod() -> dict[str, Any]:
    (job,) = manifests.load_file(ROOT / "examples" / "quickstart.yaml").jobs
    children = render.render(job, uid="uid", default_image="trainer:test")
    pod: dict[str, Any] = children.job["spec"]["template"]["spec"]
    return pod


# --------------------------------------------------------------------------------------------
# operator image


def test_operator_image_is_slim_and_has_no_ml_stack() -> None:
    (base,) = {a for a in args_of(OPERATOR, "ARG") if a.startswith("PYTHON_IMAGE=")}
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.\d+\.\d+-slim-\w+", base), base
    py_minor = re.search(r"python:(3\.\d+)", base)
    assert py_minor and Requirement(f"x{PYPROJECT['requires-python']}").specifier.contains(
        py_minor.group(1) + ".0"
    )
    text = " ".join(a for _, a in OPERATOR)
    for heavy in ("torch", "[trainer]", "[all]", "transformers", "cuda"):
        assert heavy not in text.lower(), f"the operator image must not install {heavy}"


def test_operator_image_runs_the_operator_as_the_charts_non_root_user() -> None:
    stage = final_stage(OPERATOR)
    (user,) = args_of(stage, "USER")
    uid, gid = (int(x) for x in user.split(":"))
    assert uid != 0 and gid != 0
    assert uid == chart_pod_security()["runAsUser"]
    assert exec_form(args_of(stage, "ENTRYPOINT")[0]) == ["kubetune"]
    assert exec_form(args_of(stage, "CMD")[0]) == ["operator"]
    assert PYPROJECT["scripts"]["kubetune"] == "kubetune.cli:main"
    # The entrypoint resolves: the console script exists and has the operator command.
    result = run(str(VENV_BIN / "kubetune"), "operator", "--help")
    assert result.returncode == 0, result.stderr
    assert "--namespace" in result.stdout


def test_operator_image_ports_match_settings_and_chart() -> None:
    stage = final_stage(OPERATOR)
    exposed = {int(p) for a in args_of(stage, "EXPOSE") for p in a.split()}
    defaults = settings.from_env({})
    assert exposed == {defaults.metrics_port, defaults.health_port}
    values = chart_values()["operator"]
    assert exposed == {values["metricsPort"], values["healthPort"]}
    env = env_of(stage)
    assert settings.from_env(env).metrics_port == defaults.metrics_port


# --------------------------------------------------------------------------------------------
# trainer image


def test_trainer_image_is_cuda_based_and_installs_an_existing_extra() -> None:
    (base,) = {a for a in args_of(TRAINER, "ARG") if a.startswith("CUDA_IMAGE=")}
    cuda = re.fullmatch(
        r"CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu[\d.]+", base
    )
    assert cuda, base
    (index,) = {a for a in args_of(TRAINER, "ARG") if a.startswith("TORCH_INDEX=")}
    assert index.endswith(f"/cu{cuda.group(1)}{cuda.group(2)}"), "torch's CUDA must match the base"
    runs = " ".join(args_of(TRAINER, "RUN"))
    extras = set(re.findall(r'"\.\[([a-z,]+)\]"', runs))
    assert extras == {"trainer"}
    assert "trainer" in PYPROJECT["optional-dependencies"]
    assert "--constraint /constraints.txt" in runs


def test_trainer_image_user_and_paths_match_the_pods_the_operator_renders() -> None:
    stage = final_stage(TRAINER)
    (user,) = args_of(stage, "USER")
    assert user == f"{render.RUN_AS}:{render.RUN_AS}" and render.RUN_AS != 0
    pod = quickstart_pod()
    assert pod["securityContext"]["runAsUser"] == render.RUN_AS
    (container,) = pod["containers"]
    rendered_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    image_env = env_of(stage)
    shared = {"HOME", "XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR", "TMPDIR"}
    assert {k: image_env[k] for k in shared} == {k: rendered_env[k] for k in shared}
    # Every cache path lies on a volume the pod mounts (the root filesystem is read-only).
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    volumes = set(json.loads(args_of(stage, "VOLUME")[0]))
    assert volumes <= mounts
    for key in shared:
        assert any(image_env[key].startswith(v) for v in volumes), key
    exposed = {int(p) for a in args_of(stage, "EXPOSE") for p in a.split()}
    assert exposed == {api.TRAINER_METRICS_PORT}
    assert container["command"][0] in ("python", "torchrun")  # on PATH from /opt/venv/bin
    assert env_of(TRAINER)["PATH"].startswith("/opt/venv/bin:")


def test_trainer_entrypoint_resolves() -> None:
    stage = final_stage(TRAINER)
    entry = exec_form(args_of(stage, "ENTRYPOINT")[0])
    assert entry == ["python", "-m", "kubetune_trainer"]
    assert importlib.util.find_spec("kubetune_trainer.__main__") is not None
    result = run(sys.executable, *entry[1:], "--help")
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


# --------------------------------------------------------------------------------------------
# pins, build context, Makefile, versions


@pytest.mark.parametrize(
    ("path", "groups"),
    [
        ("operator/constraints.txt", ("dependencies",)),
        ("trainer-image/constraints.txt", ("dependencies", "trainer")),
    ],
)
def test_constraints_pin_every_direct_dependency_within_pyproject(
    path: str, groups: tuple[str, ...]
) -> None:
    wanted: dict[str, Requirement] = {}
    for group in groups:
        lines = (
            PYPROJECT["dependencies"]
            if group == "dependencies"
            else PYPROJECT["optional-dependencies"][group]
        )
        wanted |= {Requirement(line).name.lower(): Requirement(line) for line in lines}
    pinned = {}
    for line in (ROOT / path).read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name] = version
    assert pinned.keys() == wanted.keys(), f"{path} is stale: run `make pins`"
    for name, version in pinned.items():
        assert wanted[name].specifier.contains(version, prereleases=True), (
            f"{path}: {name}=={version} is outside pyproject's {wanted[name].specifier}"
        )


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".venv" in ignored and ".git" in ignored  # gigabytes otherwise
    for steps in (OPERATOR, TRAINER):
        for arguments in args_of(steps, "COPY"):
            if arguments.startswith("--from"):
                continue
            *sources, _ = arguments.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                top = source.split("/")[0]
                assert not any(fnmatch.fnmatch(top, pattern) for pattern in ignored), source


def make(*args: str) -> subprocess.CompletedProcess[str]:
    make_bin = shutil.which("make")
    assert make_bin, "make is not installed"
    return run(make_bin, "--no-print-directory", f"PYTHON={sys.executable}", *args)


def test_make_images_tags_what_the_chart_and_operator_default_to() -> None:
    result = make("-n", "images")
    assert result.returncode == 0, result.stderr
    chart = yaml.safe_load((ROOT / "helm/kubetune/Chart.yaml").read_text())
    values = chart_values()
    operator_tag = f"{values['image']['repository']}:{chart['appVersion']}"
    trainer_tag = f"{values['trainer']['image']['repository']}:{chart['appVersion']}"
    assert f"-f operator/Dockerfile -t {operator_tag} ." in result.stdout
    assert f"-f trainer-image/Dockerfile -t {trainer_tag} ." in result.stdout
    assert trainer_tag == settings.DEFAULT_TRAINER_IMAGE


def test_make_generate_regenerates_every_generated_file_identically(tmp_path: Path) -> None:
    result = make(
        "generate",
        f"CRD_DIR={tmp_path}/crds",
        f"DOCS_FILE={tmp_path}/docs/api.md",
        f"CHART_CRD_DIR={tmp_path}/chart-crds",
        f"OPERATOR_DOC={tmp_path}/docs/operator.md",
    )
    assert result.returncode == 0, result.stderr
    name = "finetunejobs.kubetune.io.yaml"
    for generated, checked_in in (
        (tmp_path / "crds" / name, ROOT / "crds" / name),
        (tmp_path / "chart-crds" / name, ROOT / "helm/kubetune/crds" / name),
        (tmp_path / "docs" / "api.md", ROOT / "docs" / "api.md"),
        (tmp_path / "docs" / "operator.md", ROOT / "docs" / "operator.md"),
    ):
        assert generated.read_bytes() == checked_in.read_bytes(), f"{checked_in}: run make generate"


def test_chart_and_package_versions_agree() -> None:
    chart = yaml.safe_load((ROOT / "helm/kubetune/Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == PYPROJECT["version"]
