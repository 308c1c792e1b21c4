"""The GPU-only paths, on a CUDA device: bf16 by default, packing on the GPU attention (flash
attention's varlen kernels when installed, else ours), QLoRA with a 4-bit base on CUDA, and
the packed-equals-alone property in bf16. Skipped, with the reason, where there is no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune import api
from kubetune_trainer.__main__ import Options, run
from tests.support import trainer_runs as tr

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16, flash-attn, 4-bit on CUDA)"
)


def _run(tmp_path: Path, method: dict[str, object], **training: object) -> dict[str, object]:
    data = tr.write_rows(tmp_path / "rows.jsonl", 96)
    spec = tr.spec_dict(data, tmp_path / "out", maxSteps=6, precision="auto", **training)
    spec["method"] = method
    spec["resources"] = {"gpus": 1}
    config = api.TrainerConfig(name="gpu", spec=api.FineTuneJobSpec.model_validate(spec))
    result = run(config, Options(metrics_port=0, termination_log=None, log=lambda line: None))
    assert result.status.phase == "Succeeded"
    report: dict[str, object] = json.loads((tmp_path / "out" / "report.json").read_text())
    return report


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lora_on_cuda_trains_in_bf16_with_packing(tmp_path: Path) -> None:
    lora = {"type": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]}}
    report = _run(tmp_path, lora, packing=True, learningRate=0.005)
    model, history = report["model"], report["history"]
    assert isinstance(model, dict) and isinstance(history, list)
    assert model["device"] == "cuda:0"
    expected = "torch.bfloat16" if torch.cuda.is_bf16_supported() else "torch.float32"
    assert model["dtype"] == expected
    try:
        import flash_attn  # noqa: F401

        assert model["attention"] == "flash_attention_2"
    except ImportError:
        assert model["attention"] == "kubetune_varlen"
    assert history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "out" / "adapter" / "manifest.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_qlora_4bit_on_cuda(tmp_path: Path) -> None:
    qlora = {
        "type": "qlora",
        "lora": {"r": 4, "alpha": 8, "targetModules": ["all-linear"]},
        "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True},
    }
    report = _run(tmp_path, qlora)
    model = report["model"]
    assert isinstance(model, dict)
    assert model["device"] == "cuda:0"
    assert 0 < model["trainableParameters"] < model["parameters"]
    assert (tmp_path / "out" / "adapter" / "manifest.json").is_file()


def test_packed_rows_equal_each_sample_alone_on_cuda_bf16() -> None:
    """Packing keeps samples apart on the GPU attention too (bf16: a loose tolerance)."""
    from transformers import AutoModelForCausalLM

    from kubetune_trainer import model as model_stage

    device = torch.device("cuda", 0)
    model = AutoModelForCausalLM.from_pretrained(tr.DEMO_MODEL, dtype=torch.bfloat16).to(device)
    model_stage.set_attention(model, model_stage.attention_for(device))
    model.eval()
    a, b = [1, 40, 41, 42, 43], [1, 50, 51, 52]
    packed = torch.tensor([a + b], device=device)
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))], device=device)
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a], device=device), use_cache=False).logits[0]
        alone_b = model(input_ids=torch.tensor([b], device=device), use_cache=False).logits[0]
    torch.testing.assert_close(together[: len(a)], alone_a, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(together[len(a) :], alone_b, atol=3e-2, rtol=3e-2)
