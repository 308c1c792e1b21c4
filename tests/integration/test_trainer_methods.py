"""The other methods end to end on CPU: a full fine-tune (with gradient checkpointing, no
packing) and QLoRA (bitsandbytes 4-bit nf4 base) with a merged export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune import api
from kubetune_trainer.__main__ import Options, run
from kubetune_trainer.errors import UserError
from tests.support import trainer_runs as tr


def _run(tmp_path: Path, method: dict[str, object], **changes: object) -> dict[str, object]:
    data = tr.write_rows(tmp_path / "rows.jsonl", 64)
    spec = tr.spec_dict(data, tmp_path / "out", maxSteps=3, evalEverySteps=2)
    spec["method"] = method
    for key, value in changes.items():
        section, _, name = key.partition("__")
        spec[section][name] = value
    config = api.TrainerConfig(name="m", spec=api.FineTuneJobSpec.model_validate(spec))
    result = run(config, Options(metrics_port=0, termination_log=None, log=lambda line: None))
    assert result.status.phase == "Succeeded"
    report: dict[str, object] = json.loads((tmp_path / "out" / "report.json").read_text())
    return report


@pytest.mark.timeout(300)
def test_full_fine_tune_exports_a_model(tmp_path: Path) -> None:
    report = _run(
        tmp_path,
        {"type": "full"},
        training__gradientCheckpointing=True,
        training__packing=False,
        training__learningRate=1e-3,
    )
    out = tmp_path / "out"
    assert (out / "model" / "manifest.json").is_file()
    assert not (out / "adapter").exists()
    model_info = report["model"]
    assert isinstance(model_info, dict)
    assert model_info["trainableParameters"] == model_info["parameters"]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tr.DEMO_MODEL, use_safetensors=True)
    tuned = AutoModelForCausalLM.from_pretrained(out / "model", use_safetensors=True)
    changed = [
        n
        for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert "model.layers.0.mlp.down_proj.weight" in changed
    metrics = report["metrics"]
    assert isinstance(metrics, dict)
    assert set(metrics["base"]) == {"loss", "exactMatch"}  # scored before training


def _aligned_model(folder: Path) -> Path:
    """The demo tokenizer on a random Llama whose widths are multiples of 64: bitsandbytes'
    4-bit CPU inference kernel needs that (the demo model's MLP is 352 wide)."""
    from transformers import AutoTokenizer

    from tests.support.tiny_model import save_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(tr.DEMO_MODEL)
    return save_tiny_llama(folder, tokenizer, hidden_size=128, intermediate_size=384)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_and_merges(tmp_path: Path, bits: int) -> None:
    quantization: dict[str, object] = {"bits": bits}
    changes: dict[str, object] = {"output__mergeAdapter": True}
    if bits == 4:
        quantization.update(type="nf4", doubleQuant=True)
        changes["model__source"] = str(_aligned_model(tmp_path / "aligned"))
        changes["model__revision"] = None
    report = _run(
        tmp_path,
        {
            "type": "qlora",
            "lora": {"r": 4, "alpha": 8, "targetModules": ["all-linear"]},
            "quantization": quantization,
        },
        **changes,
    )
    out = tmp_path / "out"
    for folder in ("adapter", "merged", "tokenizer"):
        assert (out / folder / "manifest.json").is_file(), folder
    training = report["training"]
    assert isinstance(training, dict) and training["steps"] == 3
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", use_safetensors=True)
    assert merged.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert not hasattr(merged.model.layers[0].mlp.down_proj, "quant_state")


@pytest.mark.timeout(120)
def test_early_stopping_ends_the_run_and_is_reported(tmp_path: Path) -> None:
    # minDelta 10: no evaluation can improve enough, so patience 1 stops at the second one.
    report = _run(
        tmp_path,
        {"type": "lora", "lora": {"r": 4, "targetModules": ["q_proj"]}},
        training__maxSteps=20,
        training__gradientAccumulationSteps=2,
        training__earlyStopping={"patience": 1, "minDelta": 10.0},
    )
    training = report["training"]
    assert isinstance(training, dict)
    assert training["stoppedEarly"] is True
    assert training["steps"] == 4  # evaluations at steps 2 and 4
    assert training["totalSteps"] == 20
    history = report["history"]
    assert isinstance(history, list)
    assert [h["step"] for h in history if "evalLoss" in h] == [2, 4]


def test_checkpoint_of_another_job_is_a_user_error(tmp_path: Path) -> None:
    _run(tmp_path, {"type": "lora", "lora": {"r": 4, "targetModules": ["q_proj"]}})
    # The fingerprint names the field that differs before any weights are read.
    with pytest.raises(UserError, match=r"step-3 was trained with another config \(spec.method"):
        _run(tmp_path, {"type": "lora", "lora": {"r": 8, "targetModules": ["q_proj"]}})
    # A checkpoint from before fingerprints existed: the shapes still give it away.
    for fingerprint in (tmp_path / "out" / "checkpoints").glob("*/fingerprint.json"):
        fingerprint.unlink()
    for manifest in (tmp_path / "out" / "checkpoints").glob("*/manifest.json"):
        body = json.loads(manifest.read_text())
        body["files"] = [f for f in body["files"] if f["path"] != "fingerprint.json"]
        manifest.write_text(json.dumps(body))
    with pytest.raises(UserError, match=r"checkpoints/step-3 does not match the model"):
        _run(tmp_path, {"type": "lora", "lora": {"r": 8, "targetModules": ["q_proj"]}})
