"""The rules vLLM applies when it loads a LoRA adapter, checked before an export is committed.

vLLM (0.32, ``vllm/lora/peft_helper.py``, ``lora_model.py``, ``utils.py``) reads
``adapter_config.json`` and ``adapter_model.safetensors`` and refuses an adapter when:

- ``r``, ``lora_alpha`` or ``target_modules`` is missing, or ``r`` is not a positive integer;
- it uses a PEFT feature vLLM does not implement: ``modules_to_save`` (other than a
  classifier head), DoRA (``use_dora``), ``lora_bias``, a ``bias`` other than ``none``, an
  init that rewrites the base weights (PiSSA, OLoRA, CorDA, LoftQ), aLoRA, layer replication,
  BD-LoRA, QALoRA;
- its rank is above the server's ``--max-lora-rank``, which can be at most 512;
- a tensor name is not ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``;
- a tensor adapts a module that is not one of the model's linear layers (vLLM applies LoRA to
  linear layers: ``q/k/v/o_proj``, ``gate/up/down_proj`` on Llama).

``violations`` is pure (config dict, tensor names and shapes, the base model's linear modules)
so that each rule is tested alone; ``check_adapter`` reads a saved folder and raises
:class:`UserError` naming every rule that fails.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from .errors import UserError

# vLLM's LoRAConfig.max_lora_rank takes one of these; the server default is 16.
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PREFIX = "base_model.model."
# Inits that only choose the starting weights: the saved adapter is a plain LoRA.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# Classification heads are the only modules_to_save vLLM takes.
_SAVED_HEADS = ("classifier", "score")


def max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` a vLLM server needs for this rank (None: too large)."""
    return next((m for m in MAX_LORA_RANKS if m >= rank), None)


def _feature_violations(config: Mapping[str, object]) -> list[str]:
    out = []
    missing = [k for k in ("r", "lora_alpha", "target_modules") if config.get(k) in (None, "", [])]
    if missing:
        out.append(f"adapter_config.json lacks {', '.join(missing)} (vLLM requires them)")
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    unsupported = [m for m in saved if m not in _SAVED_HEADS] if isinstance(saved, list) else []
    if unsupported:
        out.append(
            f"modules_to_save {unsupported}: vLLM serves adapters without modules_to_save "
            "(only a classifier head may be saved whole)"
        )
    if config.get("use_dora"):
        out.append("use_dora: vLLM does not serve DoRA adapters")
    if config.get("lora_bias"):
        out.append("lora_bias: vLLM does not serve LoRA bias")
    bias = config.get("bias", "none")
    if bias != "none":
        out.append(
            f"bias {bias!r}: vLLM serves adapters with bias 'none' only (spec.method.lora.bias)"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        out.append(
            f"init_lora_weights {init!r}: this init rewrites the base weights, which vLLM "
            "does not do"
        )
    for key, name in (
        ("alora_invocation_tokens", "aLoRA"),
        ("layer_replication", "layer replication"),
        ("use_bdlora", "BD-LoRA"),
        ("use_qalora", "QALoRA"),
    ):
        if config.get(key):
            out.append(f"{key}: vLLM does not serve {name}")
    return out


def _rank_violations(config: Mapping[str, object]) -> list[str]:
    r = config.get("r")
    if r is None:
        return []  # reported as missing
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        return [f"r {r!r}: the rank must be a positive integer"]
    pattern = config.get("rank_pattern") or {}
    ranks = [r, *pattern.values()] if isinstance(pattern, dict) else [r]
    bad = [
        k
        for k, v in (pattern.items() if isinstance(pattern, dict) else [])
        if not isinstance(v, int) or v <= 0
    ]
    if bad:
        return [f"rank_pattern {bad}: every rank must be a positive integer"]
    top = max(int(v) for v in ranks)
    if max_lora_rank(top) is None:
        return [f"rank {top}: above {MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM takes"]
    return []


def _module_of(name: str) -> tuple[str, str] | None:
    """(module, lora_A|lora_B) of a PEFT tensor name, None when vLLM cannot parse it."""
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX) :].split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        return None
    return ".".join(parts[:-2]), parts[-2]


def _tensor_violations(
    config: Mapping[str, object],
    tensors: Mapping[str, Sequence[int]],
    linear_modules: Collection[str],
) -> list[str]:
    if not tensors:
        return ["adapter_model.safetensors holds no tensors"]
    out = []
    bad_names = [n for n in tensors if _module_of(n) is None]
    if bad_names:
        out.append(
            f"tensor names {sorted(bad_names)[:3]}: vLLM reads only "
            f"'{PREFIX}<module>.lora_A.weight' and '.lora_B.weight'"
        )
    halves: dict[str, dict[str, Sequence[int]]] = {}
    for name, shape in tensors.items():
        parsed = _module_of(name)
        if parsed:
            halves.setdefault(parsed[0], {})[parsed[1]] = shape
    unknown = sorted(m for m in halves if m not in linear_modules)
    if unknown:
        out.append(
            f"adapted modules {unknown[:3]} are not linear layers of the base model "
            "(vLLM adapts linear layers only)"
        )
    unpaired = sorted(m for m, h in halves.items() if set(h) != {"lora_A", "lora_B"})
    if unpaired:
        out.append(f"modules {unpaired[:3]} lack their lora_A or lora_B tensor")
    r = config.get("r")
    pattern = config.get("rank_pattern") or {}
    if isinstance(r, int) and not pattern:
        wrong = sorted(
            m
            for m, h in halves.items()
            if ("lora_A" in h and h["lora_A"][0] != r) or ("lora_B" in h and h["lora_B"][-1] != r)
        )
        if wrong:
            out.append(f"modules {wrong[:3]}: tensor rank differs from r {r}")
    targets = config.get("target_modules")
    if isinstance(targets, list) and halves:
        absent = sorted(
            t for t in targets if not any(m == t or m.endswith("." + t) for m in halves)
        )
        if absent:
            out.append(f"target_modules {absent}: no tensor adapts them (not in the base model?)")
    return out


def violations(
    config: Mapping[str, object],
    tensors: Mapping[str, Sequence[int]],
    linear_modules: Collection[str],
) -> list[str]:
    """Every vLLM rule the adapter breaks (empty: vLLM loads it).

    ``tensors``: name -> shape of adapter_model.safetensors; ``linear_modules``: full names of
    the base model's linear layers (``model.layers.0.self_attn.q_proj``, ...), heads excluded.
    """
    return (
        _feature_violations(config)
        + _rank_violations(config)
        + _tensor_violations(config, tensors, linear_modules)
    )


def read_adapter(folder: Path) -> tuple[dict[str, object], dict[str, list[int]]]:
    """adapter_config.json and the tensor shapes of adapter_model.safetensors (no weights read)."""
    from safetensors import safe_open

    config_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file():
        raise UserError(f"{folder}: no adapter_config.json (vLLM needs it)")
    if not weights.is_file():
        raise UserError(f"{folder}: no adapter_model.safetensors (vLLM reads safetensors)")
    config = json.loads(config_path.read_text())
    with safe_open(str(weights), framework="pt") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    return config, shapes


def check_adapter(folder: Path, linear_modules: Collection[str]) -> None:
    """Raise UserError naming each vLLM rule the saved adapter breaks."""
    config, shapes = read_adapter(folder)
    found = violations(config, shapes, linear_modules)
    if found:
        raise UserError("the adapter would be refused by vLLM: " + "; ".join(found))
