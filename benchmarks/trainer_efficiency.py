"""Trainer efficiency: kubetune's loop (packing) vs transformers.Trainer + peft and TRL.

    .venv/bin/python benchmarks/trainer_efficiency.py                 # 3 rounds, interleaved
    .venv/bin/python benchmarks/trainer_efficiency.py --rounds 1 --rows 128   # a quick look
    .venv/bin/python benchmarks/trainer_efficiency.py --rounds 1 --rows 32 \
        --model examples/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data examples/data/catalogue.jsonl --max-len 96 --lora-r 16   # a real model

Same model (examples/demo-model: Llama, hidden 128, 2 layers; or --model: any safetensors
causal-LM folder, or a .gguf file converted once into a temporary folder as the trainer does
it), same data (synthetic alpaca rows, median ~178 tokens, long tail to 1,024; or --data: the
first --rows rows of an alpaca JSONL file), same hyperparameters (LoRA r=8, or --lora-r, alpha
2r, on all linear layers, batch 8, lr 2e-4, cosine, 1 epoch, fp32, completion-only loss),
--threads torch threads (2). Every run is a fresh process (so peak RSS is per contender);
contenders alternate within each round and the median of the rounds is reported. Measured per
run: real (non-padding) tokens per second over the epoch, padding waste (padded tokens / all
tokens fed), peak RSS, time to first step (from the start of model loading to the end of the
first optimizer step), the loss after the epoch (completion tokens of 16 fixed rows that no
contender trains on: the synthetic generator's seed 1, or the last 16 rows of --data) and the
achieved FLOP/s (FlopCounter says how FLOPs are counted) against an fp32 matmul of the model's
MLP shape measured in the same run on the same threads.

Contenders:
- ``kubetune``: kubetune_trainer.train with packing (rows of at most maxSeqLength, concatenated
  per micro-batch, per-sample attention, a common prompt prefix fed once: no padding at all);
- ``hf-default``: transformers.Trainer + peft, DataCollatorForSeq2Seq dynamic padding, random
  order (what a newcomer writes);
- ``hf-grouped``: the same with train_sampling_strategy="group_by_length" (a strong peer);
- ``trl-padding-free`` / ``trl-packing``: TRL's SFTTrainer with padding_free=True, or
  packing=True (bfd, max_length = --max-len), completion-only loss, bf16 and gradient
  checkpointing off (SFTConfig turns them on by default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo-model"
CONTENDERS = ("kubetune", "hf-default", "hf-grouped", "trl-padding-free", "trl-packing")
WORDS = [
    "the",
    "a",
    "river",
    "city",
    "train",
    "garden",
    "morning",
    "letter",
    "station",
    "bridge",
    "field",
    "sea",
    "library",
    "road",
    "kitchen",
    "house",
    "market",
    "light",
    "winter",
    "summer",
    "walks",
    "looks",
    "writes",
    "waits",
    "finds",
    "reads",
    "paints",
    "visits",
    "remembers",
    "quickly",
    "slowly",
    "today",
    "again",
    "always",
    "never",
    "old",
    "new",
    "green",
    "blue",
    "small",
    "quiet",
]


# ---------------------------------------------------------------------------------------------
# data and model (shared by every contender)


def make_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Alpaca rows whose lengths follow a long-tailed distribution (median ~178 tokens)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        words = int(min(900, max(20, rng.lognormvariate(math.log(105), 0.65))))
        answer = max(4, words // 4)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words - answer))
        output = " ".join(rng.choice(WORDS) for _ in range(answer))
        rows.append({"instruction": f"Continue the text ({i}).", "input": prompt, "output": output})
    return rows


MODEL = DEMO  # --model (the child gets it on its command line)
DATA: Path | None = None  # --data: an alpaca JSONL file instead of the synthetic rows
LORA_R = 8  # --lora-r (alpha = 2r)
HELD_OUT = 16  # rows scored for the loss after training (none of them is trained on)


def _examples(count: int, held_out: bool) -> list[Any]:
    """Training rows (held_out False: the first `count`) or the HELD_OUT scoring rows (the
    synthetic generator's seed 1, or the last rows of --data), as the trainer parses them."""
    from kubetune_trainer.data import parse_row

    if DATA is None:
        rows: list[Any] = make_rows(count, 1 if held_out else 0)
    else:
        lines = [line for line in DATA.read_text().splitlines() if line.strip()]
        rows = [json.loads(line) for line in (lines[-count:] if held_out else lines[:count])]
    examples = [parse_row(i + 1, row, "alpaca", {}) for i, row in enumerate(rows)]
    bad = [e for e in examples if isinstance(e, str)]
    if bad:
        raise SystemExit(f"error: --data {DATA}: {bad[0]}")
    return examples


def encoded_rows(count: int, held_out: bool, max_len: int) -> tuple[Any, list[Any]]:
    from kubetune import api
    from kubetune_trainer.data import encode
    from kubetune_trainer.model import load_tokenizer

    tokenizer = load_tokenizer(MODEL, api.ModelSpec(source=str(MODEL)))
    return tokenizer, [encode(e, tokenizer, max_len) for e in _examples(count, held_out)]


def lora_model() -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        MODEL, dtype=torch.float32, use_safetensors=True, attn_implementation="sdpa"
    )
    config = LoraConfig(
        r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules="all-linear"
    )
    return get_peft_model(model, config)


class FlopCounter:
    """Training FLOPs the contender executes, counted while it trains (forward hooks on the
    input embedding and the output head see every position each forward computes, padding
    included, shared or skipped positions as they really run).

    Per position through the body, every Linear layer but the head costs 6 x its parameters
    when its weight trains (forward 2, input gradient 2, weight gradient 2) and 4 x when it is
    frozen (forward and the input gradient the trainable layers below still need). Under LoRA
    the base weights are frozen (4x) and the adapters' A and B train (6x). The head (tied to
    the embedding or not: frozen under LoRA, 4x) counts only at the positions where it runs:
    every position for the peers, the answer positions for kubetune. Not counted: embedding
    lookups, norms, activations, attention scores (1-2% at SmolLM2's lengths), and the
    input gradients of layer 0's q/k/v, which autograd skips (frozen embeddings below them):
    the count overstates the frozen work by about 1/60."""

    def __init__(self, model: Any) -> None:
        import torch

        head = model.get_output_embeddings()
        self.body = sum(
            (6 if m.weight.requires_grad else 4) * m.weight.numel()
            for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m is not head
        )
        self.head = (6 if head.weight.requires_grad else 4) * head.weight.numel()
        self.positions, self.head_positions = 0, 0

        def count_body(module: Any, args: Any) -> None:
            self.positions += int(args[0].numel())

        def count_head(module: Any, args: Any, output: Any) -> None:
            self.head_positions += int(output.numel() // output.shape[-1])

        self.hooks = [
            model.get_input_embeddings().register_forward_pre_hook(count_body),
            head.register_forward_hook(count_head),
        ]

    def done(self) -> dict[str, float]:
        for hook in self.hooks:
            hook.remove()
        return {
            "train_flops": float(self.body * self.positions + self.head * self.head_positions),
            "body_flops_per_position": float(self.body),
            "head_flops_per_position": float(self.head),
            "positions": self.positions,
            "head_positions": self.head_positions,
        }


def matmul_rate(m: int, k: int, n: int) -> float:
    """FLOP/s of an fp32 [m, k] @ [k, n] matmul on this process's threads (the driver picks
    the model's MLP shape at a micro-batch's tokens): the practical ceiling for the trainers'
    dense layers on these cores."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(5):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.4:
            a @ b
            count += 1
        rates.append(2 * m * k * n * count / (time.perf_counter() - start))
    return max(rates)


def held_out_loss(model: Any, max_len: int) -> float:
    """Mean completion-token loss on HELD_OUT fixed rows, one row at a time (no padding)."""
    import torch

    _, rows = encoded_rows(HELD_OUT, True, max_len)
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row.input_ids])
            labels = torch.tensor([row.labels])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            target = labels[0, 1:]
            keep = target != -100
            loss_sum += float(
                torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            )
            tokens += int(keep.sum())
    return loss_sum / max(tokens, 1)


class Clock:
    """Wall-clock and CPU time from the start of model loading and at the end of every
    optimizer step."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.steps: list[float] = []
        self.cpu: list[float] = []

    def tick(self, *_: Any) -> None:
        self.steps.append(time.monotonic())
        self.cpu.append(time.process_time())

    def callback(self) -> Any:
        """The same clock as a transformers TrainerCallback (the Trainer-based contenders)."""
        from transformers import TrainerCallback

        tick = self.tick

        class StepEnd(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                tick()

        return StepEnd()


def measured(
    model: Any, max_len: int, data: list[Any], fed_tokens: int, clock: Clock, counter: FlopCounter
) -> dict[str, float]:
    """One contender's figures after its epoch (the FLOP count stops before the held-out
    loss runs)."""
    flops, steps = counter.done(), clock.steps
    return {
        **flops,
        "loss": held_out_loss(model, max_len),
        "real_tokens": sum(len(r.input_ids) for r in data),
        "fed_tokens": fed_tokens,
        "seconds": steps[-1] - clock.start,
        "train_seconds": steps[-1] - steps[0],
        "train_cpu_seconds": clock.cpu[-1] - clock.cpu[0],
        "first_step_seconds": steps[0] - clock.start,
        "steps": len(steps),
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# contenders (each runs in its own process)


def run_kubetune(rows: int, max_len: int) -> dict[str, float]:
    import torch

    from kubetune import api
    from kubetune_trainer import model as model_stage
    from kubetune_trainer import packing, train

    tokenizer, data = encoded_rows(rows, False, max_len)
    clock = Clock()
    model = lora_model()
    attention = model_stage.attention_for(torch.device("cpu"))
    model_stage.set_attention(model, attention)
    spec = api.TrainingSpec(
        epochs=1, batchSize=8, learningRate=2e-4, scheduler="cosine", packing=True
    )
    setup = train.Setup(
        model=model,
        core=model,
        train=data,
        validation=[],
        spec=spec,
        max_len=max_len,
        pad_id=tokenizer.pad_token_id,
        device=torch.device("cpu"),
        collate_mode=packing.collate_mode(True, attention, model),  # what the trainer picks
    )
    plan = train.make_plan([len(r.input_ids) for r in data], spec, max_len, train.World())
    optimizer, scheduler = train.build_optimizer(model, spec, plan.total_steps)
    counter = FlopCounter(model)
    train.train(
        setup,
        optimizer,
        scheduler,
        train.TrainState(),
        plan,
        progress=clock.tick,
        log=lambda line: None,
    )
    # Packed micro-batches carry nothing but real tokens.
    fed = sum(len(r.input_ids) for r in data)
    return measured(model, max_len, data, fed, clock, counter)


def run_hf(rows: int, max_len: int, grouped: bool) -> dict[str, float]:
    from transformers import (
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tokenizer, data = encoded_rows(rows, False, max_len)
    features = [{"input_ids": r.input_ids, "labels": r.labels} for r in data]
    clock = Clock()
    model = lora_model()
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    fed = {"tokens": 0}

    def collate(batch: list[dict[str, Any]]) -> Any:
        out = pad(batch)
        fed["tokens"] += int(out["input_ids"].numel())
        return out

    extra: dict[str, Any] = {"train_sampling_strategy": "group_by_length"} if grouped else {}
    arguments = TrainingArguments(
        output_dir="/tmp/kubetune-bench-hf",
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # < 1: a ratio (transformers 5)
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=42,
        remove_unused_columns=False,
        disable_tqdm=True,
        **extra,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=features,
        data_collator=collate,
        callbacks=[clock.callback()],
    )
    counter = FlopCounter(model)
    trainer.train()
    return measured(model, max_len, data, fed["tokens"], clock, counter)


def run_trl(rows: int, max_len: int, packed: bool) -> dict[str, float]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer, data = encoded_rows(rows, False, max_len)
    dataset = Dataset.from_list(
        [
            {"input_ids": r.input_ids, "completion_mask": [int(x != -100) for x in r.labels]}
            for r in data
        ]
    )
    clock = Clock()
    model = lora_model()
    mode: dict[str, Any] = (
        {"packing": True, "packing_strategy": "bfd"} if packed else {"padding_free": True}
    )
    config = SFTConfig(
        output_dir="/tmp/kubetune-bench-trl",
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        completion_only_loss=True,
        max_length=max_len if packed else None,  # rows are already truncated to max_len
        dataloader_num_workers=0,
        seed=42,
        disable_tqdm=True,
        **mode,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock.callback()],
    )
    fed = {"tokens": 0}
    inner = trainer.data_collator

    def collate(batch: list[dict[str, Any]]) -> Any:
        out = inner(batch)
        fed["tokens"] += int(out["input_ids"].numel())
        return out

    trainer.data_collator = collate
    counter = FlopCounter(model)
    trainer.train()
    return measured(model, max_len, data, fed["tokens"], clock, counter)


def child(contender: str, rows: int, max_len: int, threads: int, shape: list[int]) -> None:
    import torch

    torch.set_num_threads(threads)
    if contender == "matmul":
        print("RESULT " + json.dumps({"flops": matmul_rate(*shape)}), flush=True)
        return
    import peft  # noqa: F401  (imported before any clock starts: import time is not training)
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401

    import kubetune_trainer.train  # noqa: F401

    if contender == "kubetune":
        result = run_kubetune(rows, max_len)
    elif contender.startswith("trl"):
        result = run_trl(rows, max_len, packed=contender == "trl-packing")
    else:
        result = run_hf(rows, max_len, grouped=contender == "hf-grouped")
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# driver


def child_result(contender: str, args: argparse.Namespace, shape: list[int]) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", contender, "--rows", str(args.rows)]
    command += ["--max-len", str(args.max_len), "--model", str(MODEL)]
    command += ["--lora-r", str(LORA_R), "--threads", str(args.threads)]
    command += ["--shape", *map(str, shape)]
    if DATA is not None:
        command += ["--data", str(DATA)]
    threads = str(args.threads)
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"},
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{contender} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result: dict[str, float] = json.loads(line[len("RESULT ") :])
    return result


def measure(contender: str, args: argparse.Namespace) -> dict[str, float]:
    result = child_result(contender, args, [])
    real, fed = result["real_tokens"], result["fed_tokens"]
    # Throughput over the whole epoch after the first step (steady state).
    first_real = real / result["steps"]  # approx. tokens of the first step
    result["tokens_per_second"] = (real - first_real) / max(result["train_seconds"], 1e-9)
    # Per second of this process's CPU time (all its threads): what a shared machine's other
    # jobs change least; OpenMP threads that spin waiting for a descheduled sibling add to it.
    result["tokens_per_cpu_second"] = (real - first_real) / max(result["train_cpu_seconds"], 1e-9)
    result["padding_waste"] = 1 - real / fed
    result["flops_per_real_token"] = result["train_flops"] / real
    result["flops"] = result["flops_per_real_token"] * result["tokens_per_second"]
    return result


def model_folder(source: Path, scratch: Path) -> Path:
    """--model as a safetensors folder: a .gguf file is converted once, as the trainer does it
    (dequantized to fp32, saved as a plain model of its class), into scratch."""
    if source.suffix != ".gguf":
        return source
    from kubetune import api
    from kubetune_trainer.errors import UserError
    from kubetune_trainer.model import from_gguf

    print(f"converting {source.name} to safetensors in {scratch}", flush=True)
    try:
        return from_gguf(source, scratch, api.ModelSpec(source=str(source)))
    except UserError as exc:
        raise SystemExit(f"error: --model {exc}") from None


def mlp_shape(folder: Path, tokens: int) -> list[int]:
    """[tokens, hidden] @ [hidden, intermediate]: the model's MLP projection at a micro-batch
    of `tokens` tokens (most of a step's FLOPs have this shape)."""
    config = json.loads((folder / "config.json").read_text())
    return [tokens, config["hidden_size"], config["intermediate_size"]]


def ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument(
        "--model",
        type=Path,
        default=DEMO,
        help="a safetensors model folder or a .gguf file (default: examples/demo-model)",
    )
    parser.add_argument(
        "--data", type=Path, help="an alpaca JSONL file (default: synthetic long-tailed rows)"
    )
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per contender")
    parser.add_argument(
        "--matmul-tokens", type=int, default=512, help="m of the measured [m, hidden] matmul"
    )
    parser.add_argument("--child", choices=(*CONTENDERS, "matmul"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    global MODEL, DATA, LORA_R
    DATA = args.data.resolve() if args.data else None
    LORA_R = args.lora_r
    if DATA is not None and not DATA.is_file():
        raise SystemExit(f"error: --data {DATA}: no such file")
    if args.child:
        MODEL = args.model.resolve()
        child(args.child, args.rows, args.max_len, args.threads, args.shape)
        return
    if not args.model.exists():
        raise SystemExit(f"error: --model {args.model}: no such file or folder")
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-model-") as scratch:
        MODEL = model_folder(args.model.resolve(), Path(scratch))
        run_rounds(args)


def run_rounds(args: argparse.Namespace) -> None:
    shape = mlp_shape(MODEL, args.matmul_tokens)
    results: dict[str, list[dict[str, float]]] = {c: [] for c in args.contenders}
    peaks: list[float] = []
    for round_ in range(args.rounds):
        peaks.append(child_result("matmul", args, shape)["flops"])
        print(f"round {round_ + 1} fp32 matmul {peaks[-1] / 1e9:,.1f} GFLOP/s", flush=True)
        order = args.contenders if round_ % 2 == 0 else list(reversed(args.contenders))
        for contender in order:
            result = measure(contender, args)
            results[contender].append(result)
            print(
                f"round {round_ + 1} {contender:<16} {result['tokens_per_second']:>9,.0f} tok/s "
                f"{result['tokens_per_cpu_second']:>9,.1f} tok/CPU-s "
                f"padding {result['padding_waste']:.1%} rss {result['peak_rss_mib']:.0f} MiB "
                f"first step {result['first_step_seconds']:.2f} s loss {result['loss']:.4f} "
                f"{result['flops'] / 1e9:,.1f} GFLOP/s",
                flush=True,
            )
    median = {
        c: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for c, runs in results.items()
    }
    reference = median.get("hf-default")
    peers = [m["tokens_per_second"] for c, m in median.items() if c != "kubetune"]
    best = max(peers) if peers else None
    cpu_peers = [m["tokens_per_cpu_second"] for c, m in median.items() if c != "kubetune"]
    best_cpu = max(cpu_peers) if cpu_peers else None
    peak = statistics.median(peaks)
    any_run = median[args.contenders[0]]
    data = DATA.name if DATA else "synthetic rows"
    print(
        f"\nmodel {MODEL.name}, {data}: {args.rows} rows, maxSeqLength {args.max_len}, "
        f"LoRA r={LORA_R}, {args.threads} threads, {args.rounds} round(s)\n"
        f"training FLOPs per position: {any_run['body_flops_per_position'] / 1e6:,.1f} M "
        f"through the body + {any_run['head_flops_per_position'] / 1e6:,.1f} M where the head "
        "runs (6x trainable, 4x frozen Linear parameters)\n"
        f"fp32 matmul {'x'.join(map(str, shape))}: {peak / 1e9:,.1f} GFLOP/s "
        f"(median of {len(peaks)})"
    )
    print(
        "\n| contender | real tokens/s | tokens per CPU-s | padding waste | peak RSS MiB | "
        "first step s | loss after the epoch | MFLOP per real token | GFLOP/s (of matmul) | "
        "tokens/s vs hf-default | tokens/s vs best peer | RSS vs hf-default |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c, m in median.items():
        print(
            f"| {c} | {m['tokens_per_second']:,.0f} | {m['tokens_per_cpu_second']:,.1f} | "
            f"{m['padding_waste']:.1%} | "
            f"{m['peak_rss_mib']:.0f} | {m['first_step_seconds']:.2f} | {m['loss']:.4f} | "
            f"{m['flops_per_real_token'] / 1e6:,.1f} | "
            f"{m['flops'] / 1e9:,.1f} ({m['flops'] / peak:.0%}) | "
            f"{ratio(m['tokens_per_second'], reference and reference['tokens_per_second'])} | "
            f"{ratio(m['tokens_per_second'], best)} "
            f"(CPU-s: {ratio(m['tokens_per_cpu_second'], best_cpu)}) | "
            f"{ratio(m['peak_rss_mib'], reference and reference['peak_rss_mib'])} |"
        )


if __name__ == "__main__":
    main()
