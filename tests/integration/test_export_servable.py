"""What the trainer exports is what a server loads: the adapter names its base by the spec's URI
and passes vLLM's adapter rules; the merged model carries its tokenizer, chat template and
generation config; an adapter vLLM would refuse is never committed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune import api
from kubetune_trainer.__main__ import Options, run
from kubetune_trainer.errors import UserError
from kubetune_trainer.servable import check_adapter
from tests.support import trainer_runs as tr


def _config(tmp_path: Path, **lora: object) -> api.TrainerConfig:
    data = tr.write_rows(tmp_path / "rows.jsonl", 48)
    spec = tr.spec_dict(data, tmp_path / "out", maxSteps=2, evalEverySteps=2)
    spec["model"]["source"] = tr.DEMO_MODEL.as_uri()  # file:///...: a URI, not the local copy
    spec["method"]["lora"].update(lora)
    spec["evaluation"] = {"metrics": ["loss"], "maxSamples": 2, "compareToBase": False}
    spec["output"]["mergeAdapter"] = True
    return api.TrainerConfig(name="serve", spec=api.FineTuneJobSpec.model_validate(spec))


def _run(config: api.TrainerConfig) -> None:
    result = run(config, Options(metrics_port=0, termination_log=None, log=lambda line: None))
    assert result.status.phase == "Succeeded"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_adapter_and_merged_model_are_what_a_server_loads(tmp_path: Path) -> None:
    _run(_config(tmp_path, targetModules=["all-linear"]))
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tr.DEMO_MODEL.as_uri()
    assert config["revision"] == "demo-v1"
    # all-linear is written out by name (no regex for the server to interpret)
    assert config["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert not config.get("modules_to_save") and not config.get("use_dora")
    linear = {
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    check_adapter(adapter, linear)  # the same rules, with the module list written out here

    merged = tmp_path / "out" / "merged"
    files = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    demo = AutoTokenizer.from_pretrained(tr.DEMO_MODEL)
    assert tokenizer.chat_template == demo.chat_template and tokenizer.chat_template
    generation = json.loads((merged / "generation_config.json").read_text())
    demo_generation = json.loads((tr.DEMO_MODEL / "generation_config.json").read_text())
    assert generation["eos_token_id"] == demo_generation["eos_token_id"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_adapter_vllm_would_refuse_is_not_committed(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"refused by vLLM: bias 'all': .*spec\.method\.lora\.bias"):
        _run(_config(tmp_path, bias="all"))
    assert not (tmp_path / "out" / "adapter").exists()
    assert not (tmp_path / "out" / "merged").exists()
    assert (tmp_path / "out" / "checkpoints").is_dir()  # the training is kept
