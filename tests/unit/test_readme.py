"""README says what is true: its Kubernetes recipe yields a valid job, and the demo model's size
is the one measured."""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
from pathlib import Path

import pytest

from kubetune import manifests

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def shell_lines(text: str) -> list[str]:
    """The commands of a section's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip()]


def test_the_kubernetes_recipe_creates_what_the_example_needs() -> None:
    commands = shell_lines(section("On Kubernetes"))
    example = manifests.load_file(ROOT / "examples" / "lora-s3.yaml").jobs[0]
    namespace = example.metadata.namespace
    assert f"kubectl create namespace {namespace}" in commands
    secrets = [c for c in commands if c.startswith("kubectl") and "create secret" in c]
    assert secrets and all(f"-n {namespace}" in c for c in secrets)
    secret = example.spec.storage.s3.credentialsSecret if example.spec.storage.s3 else None
    assert secret and any(f"generic {secret}" in c for c in secrets)
    uploads = " ".join(c for c in commands if " cp " in c)
    assert example.spec.model.source.rstrip("/") in uploads
    assert example.spec.dataset.source in uploads


def test_the_recipes_copy_of_the_example_is_valid_without_kueue_or_a100s(tmp_path: Path) -> None:
    (sed,) = [c for c in shell_lines(section("On Kubernetes")) if c.startswith("sed ")]
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the command reads examples/
    done = subprocess.run(["bash", "-c", sed], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = manifests.load_file(tmp_path / "my-job.yaml")
    assert not loaded.problems, loaded.problems
    (job,) = loaded.jobs
    assert job.spec.scheduling.queueName is None
    assert job.spec.resources.nodeSelector == {}
    assert job.spec.storage.s3 and job.spec.storage.s3.endpoint == "http://minio.storage.svc:9000"


def _parameters(weights: Path) -> int:
    # safetensors: an 8-byte little-endian header length, then a JSON header with the shapes.
    with weights.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


@pytest.mark.parametrize("readme", ["README.md", "examples/demo-model/README.md"])
def test_the_demo_models_parameter_count_is_the_measured_one(readme: str) -> None:
    measured = _parameters(ROOT / "examples" / "demo-model" / "model.safetensors")
    text = (ROOT / readme).read_text()
    counts = re.findall(r"([0-9][0-9,]*[0-9]k?) parameters", text)
    assert counts == [f"{measured:,}"]


def test_nothing_cites_files_outside_this_repository() -> None:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    outside = re.compile(r"DESIGN\.md|shared/notes|seed-guide")
    cited = [
        f"{name}:{number}"
        for name in files
        if name.endswith((".py", ".md", ".yaml", ".toml", ".sh", ".txt", ".tpl"))
        and name != "tests/unit/test_readme.py"
        for number, line in enumerate((ROOT / name).read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert cited == []
