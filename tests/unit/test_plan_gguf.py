"""`kubetune plan` on a .gguf source: the header reader (kubetune.gguf_header, no gguf package)
against the demo model written as a GGUF with gguf.GGUFWriter (tests/support/gguf_model: the
same tensors as examples/demo-model, so the same plan) and against the real SmolLM2 file
(gguf.GGUFReader's reading of it, and the parameter counts the trainer reports); a truncated
or foreign file is one `error:` line and exit 10."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune import api, cli, gguf_header, plan
from tests.support.gguf_model import write_llama_gguf

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo-model"
SMOLLM2 = ROOT / "examples" / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_gguf(DEMO, tmp_path_factory.mktemp("gguf") / "demo.gguf")


def manifest(tmp_path: Path, source: Path, **spec: object) -> Path:
    document = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    document["spec"]["model"] = {"source": str(source)}
    document["spec"]["dataset"]["source"] = str(ROOT / "examples" / "data" / "quickstart.jsonl")
    document["spec"].update(spec)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_the_demo_gguf_plans_like_the_folder_it_was_written_from(demo_gguf: Path) -> None:
    config, tensors = gguf_header.as_model(gguf_header.read_local(demo_gguf), "demo.gguf")
    folder_config, folder_tensors = plan.read_model(DEMO)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size"):
        assert config[key] == folder_config[key], key
    assert config["num_key_value_heads"] == folder_config["num_key_value_heads"]
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    # the same module names and (out, in) shapes as transformers' safetensors, as float32
    assert sorted((t.name, t.shape) for t in tensors) == sorted(
        (t.name, t.shape) for t in folder_tensors
    )
    assert {t.dtype for t in tensors} == {"F32"}
    spec = api.FineTuneJobSpec.model_validate(
        yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    )
    from_gguf = plan.estimate(config, tensors, spec, device_memory=2**30, on_gpu=False)
    from_folder = plan.estimate(
        folder_config, folder_tensors, spec, device_memory=2**30, on_gpu=False
    )
    assert from_gguf.to_api() == from_folder.to_api()


def test_the_header_is_read_from_the_first_bytes_only(demo_gguf: Path) -> None:
    data = demo_gguf.read_bytes()
    asked: list[int] = []

    def fetch(n: int) -> bytes:
        asked.append(n)
        return data[:n]

    gguf_header.FIRST_READ, first = 256, gguf_header.FIRST_READ
    try:
        header = gguf_header.read(fetch, len(data), "demo.gguf")
    finally:
        gguf_header.FIRST_READ = first
    assert len(asked) > 1 and asked == sorted(asked)  # grown until the header ended
    assert asked[-1] < len(data) // 4 and header.data_start <= asked[-1] + 32
    assert header.data_end() == len(data)


def test_cli_plans_a_gguf_source(
    demo_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["plan", str(manifest(tmp_path, demo_gguf)), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    _, tensors = plan.read_model(DEMO)
    assert data["methods"][0]["parameters"] == sum(t.numel for t in tensors)
    assert any("dequantizes it to float32" in n and "F32 100%" in n for n in data["notes"])
    assert "tokensPerEpoch" not in data  # no tokenizer.json next to the file: not counted


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (0.5, "truncated GGUF file (1199040 bytes, its tensors end at byte 2398080)"),
        (0.004, "it ends inside its header"),
    ],
)
def test_cli_truncated_gguf_is_one_error_line(
    demo_gguf: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keep: float,
    message: str,
) -> None:
    data = demo_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert cli.main(["plan", str(manifest(tmp_path, cut))]) == 10
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: spec.model.source:"), captured
    assert "cut.gguf: " in err[0] and message in err[0] and captured.out == ""


def test_cli_a_file_that_is_not_gguf_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"\x00" * 4096)
    assert cli.main(["plan", str(manifest(tmp_path, fake))]) == 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a GGUF file" in err[0]


def test_ggml_block_sizes_are_the_gguf_packages() -> None:
    import gguf

    for type_id, (name, block, size) in gguf_header.GGML_TYPES.items():
        kind = gguf.GGMLQuantizationType(type_id)
        assert kind.name == name and gguf.GGML_QUANT_SIZES[kind] == (block, size), name


needs_smollm2 = pytest.mark.skipif(
    not SMOLLM2.is_file(), reason="scripts/get-smollm2.sh fetches the SmolLM2 GGUF (98 MB)"
)


@needs_smollm2
def test_the_real_smollm2_header_matches_the_gguf_package() -> None:
    import gguf

    header = gguf_header.read_local(SMOLLM2)
    reader = gguf.GGUFReader(SMOLLM2)
    assert [(t.name, t.dims, t.type_id, t.offset) for t in header.tensors] == [
        (
            t.name,
            tuple(int(d) for d in t.shape),
            int(t.tensor_type),
            int(t.data_offset) - header.data_start,
        )
        for t in reader.tensors
    ]
    assert header.data_end() == SMOLLM2.stat().st_size
    config, tensors = gguf_header.as_model(header, SMOLLM2.name)
    assert config == {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    assert sum(t.numel for t in tensors) == 134_515_008  # what the trainer's model counts


@needs_smollm2
def test_cli_plans_the_smollm2_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", str(ROOT / "examples" / "smollm2.yaml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    lora = next(m for m in data["methods"] if m["method"] == "lora")
    # the trainer's own count for this manifest (README): r=16 on all linear layers
    assert lora["trainableParameters"] == 4_884_480
    assert lora["parameters"] == 139_399_488
    full = next(m for m in data["methods"] if m["method"] == "full")
    assert full["memory"]["weightsBytes"] == 134_515_008 * 4  # dequantized to float32
    assert any("Q4_1" in n and "dequantizes" in n for n in data["notes"])
