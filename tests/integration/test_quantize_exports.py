"""output.quantize end to end on CPU: a tiny LoRA run on the demo model makes every format, each
export loads with the real libraries, is scored on the test split, and its figures land in
report.json and the status; a model the formats cannot take still succeeds, with reasons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune import api
from kubetune_trainer.__main__ import Options, Result, run
from kubetune_trainer.local import summary
from tests.support import trainer_runs as tr

ALL = list(api.QUANTIZE_FORMATS)


def _run(tmp_path: Path, quantize: list[str], **model: Any) -> tuple[Result, dict[str, Any], str]:
    data = tr.write_rows(tmp_path / "rows.jsonl", 64)
    spec = tr.spec_dict(data, tmp_path / "out", maxSteps=2, evalEverySteps=2)
    spec["output"]["quantize"] = quantize
    spec["model"].update(model)
    config = api.TrainerConfig(name="q", spec=api.FineTuneJobSpec.model_validate(spec))
    lines: list[str] = []
    result = run(config, Options(metrics_port=0, termination_log=None, log=lines.append))
    assert result.status.phase == "Succeeded"
    report: dict[str, Any] = json.loads((tmp_path / "out" / "report.json").read_text())
    return result, report, "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_format_is_made_loaded_and_scored(tmp_path: Path) -> None:
    import gguf
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    from transformers import AutoModelForCausalLM

    result, report, log = _run(tmp_path, ALL)
    out = tmp_path / "out" / "quantized"
    section = report["quantization"]
    reference = section["reference"]
    assert set(reference["metrics"]) == {"loss", "exactMatch"}  # the evaluation's metrics
    exports = {row["format"]: row for row in section["exports"]}
    assert list(exports) == ALL
    for name, row in exports.items():
        assert row["produced"], row
        assert (out / name / "manifest.json").is_file()
        assert row["uri"] == (out / name).as_uri()
        assert set(row["metrics"]) == {"loss", "exactMatch"}
        assert 0 < row["latencyP50Ms"] <= row["latencyP95Ms"]
        assert row["generationTokensPerSecond"] > 0
        weights = [p for p in (out / name).iterdir() if p.suffix in (".safetensors", ".gguf")]
        assert row["sizeBytes"] == sum(p.stat().st_size for p in weights) > 0
        assert row["delta"]["loss"] == pytest.approx(
            row["metrics"]["loss"] - reference["metrics"]["loss"]
        )
    # Fewer bits, fewer bytes; the GGUF writer keeps the model's function (a wrong rotary
    # layout or tensor map would wreck the loss): f16 matches, q8_0 nearly.
    sizes = {name: row["sizeBytes"] for name, row in exports.items()}
    assert sizes["gguf-q4_0"] < sizes["gguf-q8_0"] < sizes["gguf-f16"] < reference["sizeBytes"]
    assert sizes["int8"] < reference["sizeBytes"] and sizes["nf4"] < reference["sizeBytes"]
    assert abs(exports["gguf-f16"]["delta"]["loss"]) < 1e-3
    assert abs(exports["gguf-q8_0"]["delta"]["loss"]) < 0.02
    assert abs(exports["int8"]["delta"]["loss"]) < 0.1

    # The exports load as a user loads them.
    int8 = AutoModelForCausalLM.from_pretrained(out / "int8", device_map={"": "cpu"})
    assert isinstance(int8.model.layers[0].self_attn.q_proj, Linear8bitLt)
    nf4 = AutoModelForCausalLM.from_pretrained(out / "nf4", device_map={"": "cpu"})
    assert isinstance(nf4.model.layers[0].self_attn.q_proj, Linear4bit)
    if not torch.cuda.is_available():
        # bitsandbytes' CPU 4-bit kernel refuses down_proj's width (352): kept, and said so
        assert type(nf4.model.layers[0].mlp.down_proj) is torch.nn.Linear
        assert exports["nf4"]["notes"] == [
            "2 of 14 linear layers kept in float32: bitsandbytes' 4-bit kernel on cpu "
            "refuses their shape (out x in 128x352)"
        ]
    for name, kind in (("gguf-q8_0", "Q8_0"), ("gguf-q4_0", "Q4_0"), ("gguf-f16", "F16")):
        reader = gguf.GGUFReader(out / name / "model.gguf")
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == kind and types["blk.0.attn_norm.weight"] == "F32"

    # status: one row per format; the local table shows them all
    rows = {row.format: row for row in result.status.quantized}
    assert list(rows) == ALL and report["status"]["quantized"] == [
        r.to_api() for r in result.status.quantized
    ]
    assert rows["gguf-q4_0"].sizeBytes == sizes["gguf-q4_0"]
    table = summary(result)
    assert "quantized exports: test split, vs the merged model" in table
    for name in ["merged", *ALL]:
        assert any(line.startswith(f"{name} ") for line in table.splitlines()), name
    assert "warning" not in log


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_formats_this_model_cannot_take_are_reported_and_the_run_succeeds(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tests.support.tiny_model import save_tiny_llama

    # Widths of 48 and 96 (bitsandbytes' CPU 4-bit kernel refuses every such layer) and bias
    # tensors (no place for them in our GGUF Llama layout).
    model = save_tiny_llama(
        tmp_path / "odd",
        AutoTokenizer.from_pretrained(tr.DEMO_MODEL),
        hidden_size=48,
        intermediate_size=96,
        attention_bias=True,
    )
    result, report, log = _run(
        tmp_path, ["int8", "nf4", "gguf-q8_0"], source=str(model), revision=None
    )
    out = tmp_path / "out" / "quantized"
    exports = {row["format"]: row for row in report["quantization"]["exports"]}
    assert exports["int8"]["produced"] and (out / "int8" / "manifest.json").is_file()
    gguf_reason = "the GGUF export writes Llama models without bias tensors"
    assert exports["gguf-q8_0"] == {"format": "gguf-q8_0", "produced": False, "reason": gguf_reason}
    assert f"warning: gguf-q8_0: cannot be produced for this model: {gguf_reason}" in log
    assert not (out / "gguf-q8_0").exists()
    rows = {row.format: row for row in result.status.quantized}
    assert rows["gguf-q8_0"].uri is None and rows["gguf-q8_0"].reason == gguf_reason
    if not torch.cuda.is_available():
        assert not exports["nf4"]["produced"] and not (out / "nf4").exists()
        assert exports["nf4"]["reason"].startswith(
            "bitsandbytes' 4-bit kernel on cpu refuses every linear layer"
        )
        assert "warning: nf4: cannot be produced for this model" in log
    assert "Traceback" not in log
