"""The planner's pure parts: safetensors headers, parameter counts, fits and recommendations."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import api, cli, plan

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo-model"


def spec(**training: Any) -> api.FineTuneJobSpec:
    document = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    document["training"].update(training)
    document["resources"]["gpus"] = 1
    return api.FineTuneJobSpec.model_validate(document)


def test_header_is_read_without_the_weights(tmp_path: Path) -> None:
    header = json.dumps(
        {
            "a.weight": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]},
            "__metadata__": {"format": "pt"},
        }
    ).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)  # no data section at all
    assert plan.safetensors_header(path) == [plan.Tensor("a.weight", (4, 8), "BF16")]


def test_demo_model_counts() -> None:
    config, tensors = plan.read_model(DEMO)
    total = sum(t.numel for t in tensors)
    h, i, v, layers, kv = 128, 352, 1700, 2, 64  # examples/demo-model/config.json
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o, k, v, mlp, two norms
    assert total == v * h + layers * per_layer + h  # tied head: no lm_head tensor
    result = plan.estimate(config, tensors, spec(), device_memory=None)
    lora = result.get("lora")
    adapted = 2 * (16 * (h + h) * 2 + 16 * (h + kv) * 2 + 16 * (h + i) * 3)  # r=16, all-linear
    assert lora.trainable == adapted and lora.parameters == total + adapted
    assert result.get("full").trainable == total
    q4, q8 = result.get("qlora-4bit"), result.get("qlora-8bit")
    assert q4.memory.weights < q8.memory.weights < lora.memory.weights + total * 4


def test_memory_grows_with_tokens_and_checkpointing_saves_it() -> None:
    config, tensors = plan.read_model(DEMO)

    def total(**training: Any) -> int:
        return (
            plan.estimate(config, tensors, spec(**training), device_memory=None)
            .get("lora")
            .memory.activations
        )

    assert total(batchSize=16) > total(batchSize=8)
    assert total(gradientCheckpointing=True) < total()


def test_does_not_fit_and_recommendation() -> None:
    config, tensors = plan.read_model(DEMO)
    small = plan.estimate(config, tensors, spec(), device_memory=10 * 2**20)
    message = plan.does_not_fit(small, spec())
    assert message and message.startswith("lora needs about")
    roomy = plan.estimate(config, tensors, spec(), device_memory=80 * plan.GIB, gpu="H100-80GB")
    assert plan.does_not_fit(roomy, spec()) is None and roomy.recommended == "lora"
    # a budget between qlora-4bit and lora: the recommendation moves to the lighter method
    lora, q4 = roomy.get("lora").memory.total, roomy.get("qlora-4bit").memory.total
    assert q4 < lora
    between = int((lora + q4) / 2 / plan.HEADROOM)
    tight = plan.estimate(config, tensors, spec(), device_memory=between)
    assert tight.recommended in ("qlora-4bit", "qlora-8bit")


def test_time_per_epoch_follows_tokens_and_method() -> None:
    config, tensors = plan.read_model(DEMO)
    result = plan.estimate(
        config, tensors, spec(), device_memory=None, gpu="A100-80GB", tokens_per_epoch=1_000_000
    )
    full, lora = result.seconds_per_epoch("full"), result.seconds_per_epoch("lora")
    assert full is not None and lora is not None and full > lora > 0


@pytest.mark.parametrize(
    ("text", "value"), [("80Gi", 80 * 2**30), ("24G", 24 * 10**9), ("512Mi", 512 * 2**20)]
)
def test_parse_bytes(text: str, value: int) -> None:
    assert plan.parse_bytes(text) == value


def test_cli_bad_input_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    quickstart = str(ROOT / "examples" / "quickstart.yaml")
    assert cli.main(["plan", quickstart, "--gpu-memory", "lots"]) == 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gpu-memory:")
    assert cli.main(["plan", quickstart, "--gpu-memory", "1Mi"]) == 10
    assert "DoesNotFit: lora needs about" in capsys.readouterr().err
    assert cli.main(["plan", quickstart, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["requested"] == "lora" and data["tokensPerEpoch"] > 0


def with_resources(**resources: Any) -> api.FineTuneJobSpec:
    document = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    document["resources"] = resources
    return api.FineTuneJobSpec.model_validate(document)


@pytest.mark.parametrize(
    ("resources", "memory", "source"),
    [
        (
            {"gpus": 1, "nodeSelector": {"kubetune.io/gpu-memory": "24Gi"}},
            24 * plan.GIB,
            "kubetune.io/gpu-memory",
        ),
        ({"gpus": 1, "nodeSelector": {"nvidia.com/gpu.memory": "81920"}}, 80 * plan.GIB, "MiB"),
        (
            {"gpus": 2, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}},
            40 * plan.GIB,
            "A100-40GB",
        ),
        ({"gpus": 1, "nodeSelector": {"nvidia.com/gpu.product": "Tesla-T4"}}, 16 * plan.GIB, "T4"),
        (
            {"gpus": 1, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L40S"}},
            48 * plan.GIB,
            "L40S",
        ),
        ({"gpus": 0, "memory": "512Mi"}, 512 * 2**20, "resources.memory"),
        ({"gpus": 1, "memory": "64Gi"}, None, None),  # a GPU job says nothing about its GPUs
        ({"gpus": 1, "nodeSelector": {"nvidia.com/gpu.product": "Mystery-9000"}}, None, None),
    ],
)
def test_device_memory_from_the_node_selector_or_the_gpu_table(
    resources: dict[str, Any], memory: int | None, source: str | None
) -> None:
    found, where = plan.device_memory(with_resources(**resources))
    assert found == memory
    assert (where is None) if source is None else (source in (where or ""))


def test_job_plan_is_status_plan_and_refuses_what_does_not_fit() -> None:
    config, tensors = plan.read_model(DEMO)
    tight = with_resources(gpus=0, memory="32Mi")
    status, refusal = plan.job_plan(config, tensors, tight)
    assert refusal is not None and refusal.startswith("lora needs about")
    assert status.requested == "lora" and status.deviceMemoryBytes == 32 * 2**20
    assert [m.method for m in status.methods] == list(plan.METHODS)
    expected = plan.estimate(config, tensors, tight, device_memory=32 * 2**20, on_gpu=False)
    assert [m.memoryBytes for m in status.methods] == [
        m.memory.total for m in expected.methods
    ]  # the same numbers as `kubetune plan`
    roomy, refusal = plan.job_plan(config, tensors, with_resources(gpus=0, memory="4Gi"))
    assert refusal is None and all(m.fits for m in roomy.methods)
    unknown, refusal = plan.job_plan(config, tensors, with_resources(gpus=1))
    assert refusal is None and unknown.deviceMemoryBytes is None
    assert api.FineTuneJobStatus(plan=status).to_api()["plan"]["deviceMemoryFrom"] == (
        "resources.memory"
    )
