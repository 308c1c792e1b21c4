"""vLLM (CPU, real server) serves what the trainer exports, and generates what the trainer does.

One small LoRA run on the demo model (the quickstart's LoRA: r 16 on all linear layers;
mergeAdapter on). vLLM then serves the demo base model with our adapter (`--enable-lora
--lora-modules tuned=<adapter>`) and, in a second server loading alongside it, the merged
model. Each test-split prompt goes to vLLM as the token ids the trainer's evaluation
feeds its model (data.prompt_ids: the same chat template rendering, no second one on the
server), greedy, the same max tokens; vLLM's continuations must equal the trainer's own greedy
generations (evaluate.generations, the code generation metrics score) on at least 95 % of
prompts. The match figures are printed (run with -s) and written in docs/trainer.md.

    python -m pytest tests/integration/test_vllm_serving.py -q -s
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubetune import api
from kubetune_trainer.__main__ import Options, load_data, run
from kubetune_trainer.servable import max_lora_rank
from tests.support import trainer_runs as tr
from tests.support import vllm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_NEW_TOKENS = 16
MIN_MATCH = 0.95
# No torch.compile warm-up on the server (minutes on a small CPU): the same kernels, eager.
FAST = ("--enforce-eager", "--max-model-len=512", "--max-num-seqs=8")


@dataclass
class Trained:
    out: Path
    rank: int
    prompts: list[list[int]]  # the test split's prompts as the trainer renders them
    tuned: list[list[int]]  # the trainer's greedy generations with the adapter
    base: list[list[int]]  # ... and without it
    stop: list[int]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.data import prompt_ids
    from kubetune_trainer.evaluate import generations, stop_token_ids

    tmp = tmp_path_factory.mktemp("serve")
    data = tr.write_rows(tmp / "rows.jsonl", 200)
    spec = tr.spec_dict(data, tmp / "out", maxSteps=8, evalEverySteps=8)
    spec["dataset"]["split"] = {"validation": 0.05, "test": 0.2, "seed": 0}
    # the quickstart's adapter shape: every linear layer (vLLM packs q/k/v and gate/up)
    spec["method"]["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}
    spec["evaluation"] = {"metrics": ["loss"], "maxSamples": 4, "maxNewTokens": MAX_NEW_TOKENS}
    spec["output"]["mergeAdapter"] = True
    config = api.TrainerConfig(name="serve", spec=api.FineTuneJobSpec.model_validate(spec))
    options = Options(metrics_port=0, termination_log=None, log=lambda line: None)
    assert run(config, options).status.phase == "Succeeded"
    out = tmp / "out"

    # The test split as the trainer split it (the committed ids say so), rendered its way.
    rows = load_data(config, options, tmp / "work").splits.test
    assert sorted(r.id for r in rows) == (out / "splits" / "test.ids").read_text().split()
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    max_len = config.spec.dataset.maxSeqLength
    base = AutoModelForCausalLM.from_pretrained(tr.DEMO_MODEL, use_safetensors=True)
    model = PeftModel.from_pretrained(base, out / "adapter")
    evaluation = config.spec.evaluation
    tuned = generations(model, tokenizer, rows, evaluation, max_len, "cpu")
    with model.disable_adapter():
        untuned = generations(model, tokenizer, rows, evaluation, max_len, "cpu")
    lora = config.spec.method.lora
    assert lora is not None
    return Trained(
        out=out,
        rank=lora.r,
        prompts=[prompt_ids(r, tokenizer, max_len) for r in rows],
        tuned=tuned,
        base=untuned,
        stop=stop_token_ids(model, tokenizer),
    )


@pytest.fixture(scope="module")
def servers(trained: Trained) -> Iterator[dict[str, vllm.Server]]:
    """Both servers, loading side by side (each start is minutes of mostly single-threaded
    imports on a small CPU): base + our adapter, and the merged model."""
    rank = max_lora_rank(trained.rank)
    adapter_args = [
        "--enable-lora",
        f"--lora-modules=tuned={trained.out / 'adapter'}",
        f"--max-lora-rank={rank}",
        "--max-loras=1",
        *FAST,
    ]
    logs = trained.out.parent
    # runtime loading on: the last test asks the adapter server to load one it must refuse
    runtime = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    started: dict[str, vllm.Server] = {}
    try:
        started["adapter"] = vllm.start(
            tr.DEMO_MODEL, logs / "vllm-adapter.log", adapter_args, extra_env=runtime
        )
        started["merged"] = vllm.start(
            trained.out / "merged", logs / "vllm-merged.log", FAST, served_model_name="merged"
        )
        for server in started.values():
            vllm.wait_ready(server, timeout=600)
        yield started
    finally:
        for server in started.values():
            vllm.stop(server.process)


@pytest.fixture(scope="module")
def adapter_server(servers: dict[str, vllm.Server]) -> vllm.Server:
    return servers["adapter"]


@pytest.fixture(scope="module")
def merged_server(servers: dict[str, vllm.Server]) -> vllm.Server:
    return servers["merged"]


def _served(server: vllm.Server, model: str, trained: Trained) -> list[list[int]]:
    """vLLM's greedy continuation of each prompt, token ids cut at the first stop token (as
    the trainer cuts its own)."""
    out = []
    for prompt in trained.prompts:
        ids = server.complete(prompt, MAX_NEW_TOKENS, model=model)["token_ids"]
        cut = next((i for i, t in enumerate(ids) if t in trained.stop), len(ids))
        out.append(ids[:cut])
    return out


def _match(served: Sequence[list[int]], expected: Sequence[list[int]]) -> float:
    return sum(a == b for a, b in zip(served, expected, strict=True)) / len(expected)


def _report(what: str, match: float, n: int) -> None:
    print(f"\n{what}: {match:.1%} of {n} test prompts identical to the trainer's generations")


def test_the_trainer_run_has_real_generations(trained: Trained) -> None:
    assert len(trained.prompts) >= 30
    assert sum(bool(g) for g in trained.tuned) >= 0.9 * len(trained.tuned)
    # the adapter changes what the model says, so a server that ignored it could not match
    assert _match(trained.tuned, trained.base) < 0.8


def test_vllm_serves_our_adapter_and_generates_as_the_trainer(
    trained: Trained, adapter_server: vllm.Server
) -> None:
    served = _served(adapter_server, "tuned", trained)
    match = _match(served, trained.tuned)
    _report("vLLM, base + LoRA adapter", match, len(served))
    assert match >= MIN_MATCH
    base = _served(adapter_server, "base", trained)  # the same server without the adapter
    _report("vLLM, base alone vs the trainer's base", _match(base, trained.base), len(base))
    assert _match(base, trained.base) >= MIN_MATCH


def test_vllm_serves_the_merged_model_and_generates_as_the_trainer(
    trained: Trained, merged_server: vllm.Server
) -> None:
    served = _served(merged_server, "merged", trained)
    match = _match(served, trained.tuned)
    _report("vLLM, merged model", match, len(served))
    assert match >= MIN_MATCH


def test_vllm_refuses_an_adapter_our_check_refuses(
    trained: Trained, adapter_server: vllm.Server, tmp_path: Path
) -> None:
    """servable.py's rules are vLLM's: a DoRA-flagged copy of our adapter is refused by both,
    each naming DoRA."""
    from kubetune_trainer.errors import UserError
    from kubetune_trainer.export import linear_modules
    from kubetune_trainer.servable import check_adapter

    bad = tmp_path / "dora"
    bad.mkdir()
    for f in (trained.out / "adapter").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tr.DEMO_MODEL, use_safetensors=True)
    with pytest.raises(UserError, match="vLLM does not serve DoRA"):
        check_adapter(bad, linear_modules(base))
    check_adapter(trained.out / "adapter", linear_modules(base))  # the original passes
    with pytest.raises(RuntimeError, match="DoRA"):
        adapter_server.post("/v1/load_lora_adapter", {"lora_name": "dora", "lora_path": str(bad)})


@pytest.mark.parametrize(
    ("fmt", "said"),
    [
        ("gguf-q8_0", "is not a valid JSON file"),
        ("int8", "Unknown quantization method: bitsandbytes"),
    ],
)
def test_vllm_cannot_serve_our_quantized_exports_and_staging_refuses_them_first(
    tmp_path: Path, fmt: str, said: str
) -> None:
    """What api.VLLM_CANNOT_SERVE says is what vLLM 0.32 does: started the way `kubetune run`
    stages the export (a GGUF file with --tokenizer the trainer's tokenizer; an int8 folder),
    the real server exits with that error; the spec refuses the format without a staging image,
    and `kubetune run`'s probe of this vLLM refuses it before anything starts."""
    import torch

    from kubetune_trainer import quantize
    from kubetune_trainer import staging as runner

    export = tmp_path / "quantized" / fmt
    export.mkdir(parents=True)
    if api.is_gguf_format(fmt):
        quantize.write_gguf(tr.DEMO_MODEL, export / api.GGUF_FILE, quantize.GGUF_TYPES[fmt])
    else:
        quantize.write_bitsandbytes(fmt, tr.DEMO_MODEL, export, torch.device("cpu"))
    spec = tr.spec_dict(tr.write_rows(tmp_path / "rows.jsonl", 40), tmp_path / "out")
    spec["output"].update(mergeAdapter=True, quantize=[fmt])
    spec["staging"] = {"gpus": 0, "artifact": fmt}
    with pytest.raises(ValueError, match=f"{fmt}: the default staging engine cannot serve it"):
        api.FineTuneJobSpec.model_validate(spec)
    spec["staging"]["image"] = "registry.example.com/a-vllm-of-ones-own:1"
    parsed = api.FineTuneJobSpec.model_validate(spec)
    why = runner.missing_loader(vllm.VENV, fmt)
    assert why is not None and f"no {api.quantized_loader(fmt)} loader" in why, why

    exports = [api.QuantizedExport(format=fmt, uri=export.as_uri())]
    artifacts = api.Artifacts(tokenizer=str(tr.DEMO_MODEL))
    args = runner.local_engine_args(
        parsed,
        artifacts,
        vllm.free_port(),
        resolve=lambda _, uri: Path(uri.removeprefix("file://")),
        quantized=exports,
    )
    if api.is_gguf_format(fmt):
        assert args[0].endswith(api.GGUF_FILE) and args[args.index("--tokenizer") + 1]
    log = tmp_path / "vllm.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            runner.engine_command(vllm.VENV, [*args, *FAST]),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=vllm.env(),
            start_new_session=True,
        )
    try:
        code = process.wait(timeout=600)
    finally:
        vllm.stop(process)
    text = log.read_text(errors="replace")
    assert code != 0 and said in text, vllm.log_tail(log)
    print(f"\nvLLM on the {fmt} export: " + next(x for x in text.splitlines() if said in x)[:200])
