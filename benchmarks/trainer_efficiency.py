"""Trainer efficiency: kubetune's loop (packing) vs transformers.Trainer + peft (default padding).

    .venv/bin/python benchmarks/trainer_efficiency.py                 # 3 rounds, interleaved
    .venv/bin/python benchmarks/trainer_efficiency.py --rounds 1 --rows 128   # a quick look
    .venv/bin/python benchmarks/trainer_efficiency.py --model DIR --rows 32 --max-len 256
                                                           # a real model (safetensors folder)

Same model (examples/demo-model: Llama, hidden 128, 2 layers; or --model DIR, any safetensors
causal-LM folder, e.g. SmolLM2-135M as kubetune converts it from GGUF), same data (synthetic
alpaca rows, median ~178 tokens, long tail to 1,024), same hyperparameters (LoRA r=8 on all
linear layers, batch 8, lr 2e-4, cosine, 1 epoch, fp32, 2 threads, completion-only loss).
Every run is a fresh process (so peak RSS is per contender); contenders alternate within each
round and the median of the rounds is reported. Measured per run: real (non-padding) tokens
per second over the epoch, padding waste (padded tokens / all tokens fed), peak RSS, time to
first step (from the start of model loading to the end of the first optimizer step), the loss
after the epoch (completion tokens of 16 fixed rows that no contender trains on) and the
achieved FLOP/s against an fp32 matmul rate measured in the same run on the same threads
(flops_per_token says how FLOPs are counted).

Contenders:
- ``kubetune``: kubetune_trainer.train with packing (rows of at most maxSeqLength, concatenated
  per micro-batch, per-sample attention: no padding at all);
- ``hf-default``: transformers.Trainer + peft, DataCollatorForSeq2Seq dynamic padding, random
  order (what a newcomer writes);
- ``hf-grouped``: the same with train_sampling_strategy="group_by_length" (a strong peer);
- ``trl-padding-free`` / ``trl-packing``: TRL's SFTTrainer with padding_free=True, or
  packing=True (bfd, max_length 1,024), completion-only loss, bf16 and gradient checkpointing
  off (SFTConfig turns them on by default).
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
HELD_OUT = 16  # rows scored for the loss after training (seed 1: none of them is trained on)


def encoded_rows(count: int, seed: int, max_len: int) -> tuple[Any, list[Any]]:
    from transformers import AutoTokenizer

    from kubetune_trainer.data import Example, encode

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    out = []
    for i, row in enumerate(make_rows(count, seed)):
        example = Example(
            id=str(i),
            row=i + 1,
            messages=(
                ("user", row["instruction"] + "\n\n" + row["input"]),
                ("assistant", row["output"]),
            ),
        )
        out.append(encode(example, tokenizer, max_len))
    return tokenizer, out


def lora_model() -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        MODEL, dtype=torch.float32, use_safetensors=True, attn_implementation="sdpa"
    )
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, config)


def flops_per_token(model: Any) -> float:
    """Training FLOPs per token of every Linear layer (the LM head included, tied or not): a
    trainable weight costs 6 x its parameters (forward 2, input gradient 2, weight gradient 2),
    a frozen one 4 (forward and the input gradient the layers below still need; no weight
    gradient). LoRA's A and B are trainable Linears, so they count 6x. Embedding lookups,
    norms, activations and attention scores (about 2% of the total for SmolLM2 at these
    lengths) are not counted. The head is counted at every position, as the peers run it;
    kubetune runs it only where an answer token is predicted (logits_to_keep), so its figure
    is an effective rate: the same nominal work per token for every contender."""
    import torch

    total = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += (6 if module.weight.requires_grad else 4) * module.weight.numel()
    return total


def matmul_rate() -> float:
    """FLOP/s of a 1024x1024 fp32 matmul on this process's threads: the machine's practical
    ceiling for the trainers' dense layers."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(5):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.4:
            a @ b
            count += 1
        rates.append(2 * 1024**3 * count / (time.perf_counter() - start))
    return max(rates)


def held_out_loss(model: Any, max_len: int) -> float:
    """Mean completion-token loss on HELD_OUT fixed rows, one row at a time (no padding)."""
    import torch

    _, rows = encoded_rows(HELD_OUT, 1, max_len)
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


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# contenders (each runs in its own process)


def run_kubetune(rows: int, max_len: int) -> dict[str, float]:
    import torch

    from kubetune import api
    from kubetune_trainer import model as model_stage
    from kubetune_trainer import train

    tokenizer, data = encoded_rows(rows, 0, max_len)
    start = time.monotonic()
    model = lora_model()
    model_stage.set_attention(model, model_stage.attention_for(torch.device("cpu")))
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
    )
    plan = train.make_plan([len(r.input_ids) for r in data], spec, max_len, train.World())
    optimizer, scheduler = train.build_optimizer(model, spec, plan.total_steps)
    steps: list[float] = []
    train.train(
        setup,
        optimizer,
        scheduler,
        train.TrainState(),
        plan,
        progress=lambda entry: steps.append(time.monotonic()),
        log=lambda line: None,
    )
    real = sum(len(r.input_ids) for r in data)
    return {
        "loss": held_out_loss(model, max_len),
        "flops_per_token": flops_per_token(model),
        "real_tokens": real,
        "fed_tokens": real,  # flat micro-batches: nothing but real tokens
        "seconds": steps[-1] - start,
        "train_seconds": steps[-1] - steps[0],
        "first_step_seconds": steps[0] - start,
        "steps": len(steps),
    }


def run_hf(rows: int, max_len: int, grouped: bool) -> dict[str, float]:
    from transformers import (
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer, data = encoded_rows(rows, 0, max_len)
    features = [{"input_ids": r.input_ids, "labels": r.labels} for r in data]
    start = time.monotonic()
    model = lora_model()
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    fed = {"tokens": 0}

    def collate(batch: list[dict[str, Any]]) -> Any:
        out = pad(batch)
        fed["tokens"] += int(out["input_ids"].numel())
        return out

    steps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            steps.append(time.monotonic())

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
        callbacks=[Clock()],
    )
    trainer.train()
    real = sum(len(r.input_ids) for r in data)
    return {
        "loss": held_out_loss(model, max_len),
        "flops_per_token": flops_per_token(model),
        "real_tokens": real,
        "fed_tokens": fed["tokens"],
        "seconds": steps[-1] - start,
        "train_seconds": steps[-1] - steps[0],
        "first_step_seconds": steps[0] - start,
        "steps": len(steps),
    }


def run_trl(rows: int, max_len: int, packed: bool) -> dict[str, float]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer, data = encoded_rows(rows, 0, max_len)
    dataset = Dataset.from_list(
        [
            {"input_ids": r.input_ids, "completion_mask": [int(x != -100) for x in r.labels]}
            for r in data
        ]
    )
    start = time.monotonic()
    model = lora_model()
    steps: list[float] = []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            steps.append(time.monotonic())

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
        callbacks=[Clock()],
    )
    fed = {"tokens": 0}
    inner = trainer.data_collator

    def collate(batch: list[dict[str, Any]]) -> Any:
        out = inner(batch)
        fed["tokens"] += int(out["input_ids"].numel())
        return out

    trainer.data_collator = collate
    trainer.train()
    real = sum(len(r.input_ids) for r in data)
    return {
        "loss": held_out_loss(model, max_len),
        "flops_per_token": flops_per_token(model),
        "real_tokens": real,
        "fed_tokens": fed["tokens"],
        "seconds": steps[-1] - start,
        "train_seconds": steps[-1] - steps[0],
        "first_step_seconds": steps[0] - start,
        "steps": len(steps),
    }


def child(contender: str, rows: int, max_len: int) -> None:
    if contender == "matmul":
        import torch

        torch.set_num_threads(2)
        print("RESULT " + json.dumps({"flops": matmul_rate()}), flush=True)
        return
    import peft  # noqa: F401  (imported before any clock starts: import time is not training)
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401

    import kubetune_trainer.train  # noqa: F401

    torch.set_num_threads(2)
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


def child_result(contender: str, rows: int, max_len: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", contender, "--rows", str(rows)]
    command += ["--max-len", str(max_len), "--model", str(MODEL)]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"},
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{contender} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result: dict[str, float] = json.loads(line[len("RESULT ") :])
    return result


def measure(contender: str, rows: int, max_len: int) -> dict[str, float]:
    result = child_result(contender, rows, max_len)
    real, fed = result["real_tokens"], result["fed_tokens"]
    # Throughput over the whole epoch after the first step (steady state).
    first_real = real / result["steps"]  # approx. tokens of the first step
    result["tokens_per_second"] = (real - first_real) / max(result["train_seconds"], 1e-9)
    result["padding_waste"] = 1 - real / fed
    result["flops"] = result["flops_per_token"] * result["tokens_per_second"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument(
        "--model", type=Path, default=DEMO, help="a safetensors model folder (default: demo)"
    )
    parser.add_argument("--child", choices=(*CONTENDERS, "matmul"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global MODEL
    MODEL = args.model.resolve()
    if args.child:
        child(args.child, args.rows, args.max_len)
        return
    results: dict[str, list[dict[str, float]]] = {c: [] for c in args.contenders}
    peaks: list[float] = []
    for round_ in range(args.rounds):
        peaks.append(child_result("matmul", 0, 0)["flops"])
        print(f"round {round_ + 1} fp32 matmul {peaks[-1] / 1e9:,.1f} GFLOP/s", flush=True)
        order = args.contenders if round_ % 2 == 0 else list(reversed(args.contenders))
        for contender in order:
            result = measure(contender, args.rows, args.max_len)
            results[contender].append(result)
            print(
                f"round {round_ + 1} {contender:<16} {result['tokens_per_second']:>9,.0f} tok/s "
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
    best = max(peers, default=math.nan)
    peak = statistics.median(peaks)
    print(
        f"\nmodel {MODEL.name}: {median[args.contenders[0]]['flops_per_token'] / 1e6:,.1f} "
        f"MFLOP per trained token (6x trainable, 4x frozen Linear parameters); fp32 matmul "
        f"{peak / 1e9:,.1f} GFLOP/s (median of {len(peaks)})"
    )
    print(
        "\n| contender | real tokens/s | padding waste | peak RSS MiB | first step s | "
        "loss after the epoch | GFLOP/s (of matmul) | tokens/s vs hf-default | "
        "tokens/s vs best peer | RSS vs hf-default |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c, m in median.items():
        ratio = m["tokens_per_second"] / reference["tokens_per_second"] if reference else math.nan
        rss = m["peak_rss_mib"] / reference["peak_rss_mib"] if reference else math.nan
        print(
            f"| {c} | {m['tokens_per_second']:,.0f} | {m['padding_waste']:.1%} | "
            f"{m['peak_rss_mib']:.0f} | {m['first_step_seconds']:.2f} | {m['loss']:.4f} | "
            f"{m['flops'] / 1e9:,.1f} ({m['flops'] / peak:.0%}) | {ratio:.2f}x | "
            f"{m['tokens_per_second'] / best:.2f}x | {rss:.2f}x |"
        )


if __name__ == "__main__":
    main()
