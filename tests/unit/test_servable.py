"""vLLM's LoRA adapter rules (servable.py): a good adapter passes, each broken rule is named."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_trainer import servable

MODULES = {
    f"model.layers.{i}.{kind}"
    for i in range(2)
    for kind in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")
}


def _config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "modules_to_save": None,
        "use_dora": False,
        "init_lora_weights": True,
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not ...}


def _tensors(r: int = 4, modules: tuple[str, ...] = ("q_proj", "v_proj")) -> dict[str, list[int]]:
    out = {}
    for i in range(2):
        for m in modules:
            name = f"base_model.model.model.layers.{i}.self_attn.{m}"
            out[f"{name}.lora_A.weight"] = [r, 128]
            out[f"{name}.lora_B.weight"] = [64, r]
    return out


def test_a_plain_lora_adapter_passes() -> None:
    assert servable.violations(_config(), _tensors(), MODULES) == []


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({"r": ...}, "lacks r"),
        ({"lora_alpha": ...}, "lacks lora_alpha"),
        ({"target_modules": ...}, "lacks target_modules"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
        ({"use_dora": True}, "use_dora: vLLM does not serve DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "all"}, "bias 'all'"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa'"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"r": 0}, "r 0: the rank must be a positive integer"),
        ({"r": 1024}, "rank 1024: above 512"),
        ({"rank_pattern": {"q_proj": 600}}, "rank 600"),
    ],
)
def test_each_config_rule_is_named(changes: dict[str, Any], rule: str) -> None:
    found = servable.violations(_config(**changes), _tensors(), MODULES)
    assert any(rule in v for v in found), found


def test_classifier_heads_may_be_saved_whole() -> None:
    assert servable.violations(_config(modules_to_save=["score"]), _tensors(), MODULES) == []


def test_tensor_names_must_follow_peft() -> None:
    tensors = {k.removeprefix("base_model.model."): v for k, v in _tensors().items()}
    found = servable.violations(_config(), tensors, MODULES)
    assert any("'base_model.model.<module>.lora_A.weight'" in v for v in found), found
    dora = {
        **_tensors(),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": [64],
    }
    assert any("tensor names" in v for v in servable.violations(_config(), dora, MODULES))


def test_adapted_modules_must_be_linear_layers_of_the_base_model() -> None:
    tensors = {**_tensors(), "base_model.model.model.embed_tokens.lora_A.weight": [4, 1700]}
    tensors["base_model.model.model.embed_tokens.lora_B.weight"] = [128, 4]
    found = servable.violations(_config(), tensors, MODULES)
    assert any("adapted modules ['model.embed_tokens'] are not linear layers" in v for v in found)


def test_each_module_has_both_halves_of_the_rank_r() -> None:
    tensors = _tensors()
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    found = servable.violations(_config(), tensors, MODULES)
    assert any("lack their lora_A or lora_B" in v for v in found), found
    found = servable.violations(_config(r=8), _tensors(r=4), MODULES)
    assert any("tensor rank differs from r 8" in v for v in found), found


def test_target_modules_must_be_in_the_adapter() -> None:
    found = servable.violations(
        _config(target_modules=["q_proj", "gate_proj"]), _tensors(), MODULES
    )
    assert found == ["target_modules ['gate_proj']: no tensor adapts them (not in the base model?)"]


def test_an_empty_adapter_is_refused() -> None:
    assert servable.violations(_config(), {}, MODULES) == [
        "adapter_model.safetensors holds no tensors"
    ]


@pytest.mark.parametrize(("rank", "server"), [(1, 1), (4, 8), (16, 16), (300, 320), (513, None)])
def test_the_server_rank_a_rank_needs(rank: int, server: int | None) -> None:
    assert servable.max_lora_rank(rank) == server


def test_the_exported_config_names_the_base_by_its_source_uri() -> None:
    from kubetune import api
    from kubetune_trainer.export import serving_config

    model = api.ModelSpec(source="s3://models/llama", revision="v3")
    peft_wrote = {
        "base_model_name_or_path": "/tmp/kubetune-x/model",
        "target_modules": {"v_proj", "q_proj"},
    }
    config = serving_config(peft_wrote, model)
    assert config["base_model_name_or_path"] == "s3://models/llama"
    assert config["revision"] == "v3"
    assert config["target_modules"] == ["q_proj", "v_proj"]
    # A GGUF source: the adapter names the exported, dequantized base (no revision of its own).
    gguf = api.ModelSpec(source="s3://models/smol.Q4_1.gguf", revision="v1")
    config = serving_config(peft_wrote, gguf, base="s3://out/run/base")
    assert (config["base_model_name_or_path"], config["revision"]) == ("s3://out/run/base", None)


def test_all_linear_module_paths_become_layer_names_only_when_they_select_the_same() -> None:
    from kubetune import api
    from kubetune_trainer.export import serving_config

    model = api.ModelSpec(source="s3://models/llama")
    every = sorted(MODULES)
    assert serving_config({"target_modules": every}, model, MODULES)["target_modules"] == [
        "down_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]
    # layer 0 only: "q_proj" would also adapt layer 1, so the paths stay
    first = [m for m in every if m.startswith("model.layers.0.")]
    assert serving_config({"target_modules": first}, model, MODULES)["target_modules"] == first
