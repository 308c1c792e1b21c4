"""Serving latency and throughput: base vs tuned (LoRA adapter on the base) vs tuned (merged)
vs quantized, under the same load, in one run, on vLLM (CPU) with guidellm.

    python benchmarks/staging_serving.py [--steps 30] [--concurrency 1 4] [--seconds 15]
        [--rounds 3] [--output-tokens 32] [--out DIR]

Trains the quickstart (examples/quickstart.yaml, `--steps` LoRA steps, mergeAdapter on, the
gguf-q8_0 and int8 exports of output.quantize; with `--out DIR` holding a finished run's
`out/`, that run is reused), then starts vLLM from .tools/vllm (scripts/install-vllm.sh) on
everything there is to serve, all engines side by side:

- the base model with the adapter as a LoRA module (served as `base` and `tuned`);
- the merged model;
- the merged model quantized by vLLM itself when it loads (`--quantization fp8_per_channel`:
  fp8 weights, per output channel; not one of our exports);
- each quantized export (a GGUF file with `--tokenizer`, a bitsandbytes int8 folder): served
  and measured when vLLM starts on it, else the table gives vLLM's error line.

Each served model gets a few untimed warm-up requests; then, in `--rounds` rounds (the model
order reversed every round, so that a change in the machine's load falls on all of them), one
guidellm concurrency sweep each: every level keeps that many requests in flight for
`--seconds`. Prompts are the test split's, formatted as the trainer formats them, and every
request asks for exactly `--output-tokens` tokens (guidellm sends max_tokens with ignore_eos,
so no model stops early at EOS): output tokens/s compares what each engine delivers per token,
not how long each model's answers are. The table gives the median of the rounds and the ratio
against base. A closed loop is used rather than guidellm's `poisson` profile, which in
guidellm 0.8.1 is not a Poisson process (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "trainer-image")]

from kubetune import api, manifests  # noqa: E402
from kubetune import staging as st  # noqa: E402
from kubetune_trainer import local, staging  # noqa: E402
from kubetune_trainer.errors import InfraError  # noqa: E402

EXPORTS = ("gguf-q8_0", "int8")  # the quick ones to make; nf4 needs minutes on CPU


def train(workdir: Path, steps: int) -> tuple[api.TrainerConfig, Path]:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = doc["spec"]
    spec["model"]["source"] = str(ROOT / "examples" / "demo-model")
    spec["dataset"]["source"] = str(ROOT / "examples" / "data" / "quickstart.jsonl")
    spec["output"] = {
        "destination": str(workdir / "out"),
        "mergeAdapter": True,
        "quantize": list(EXPORTS),
    }
    spec["evaluation"] = {"maxSamples": 4, "maxNewTokens": 2, "metrics": ["loss"]}
    spec["training"].pop("epochs", None)
    spec["training"]["maxSteps"] = steps
    path = workdir / "job.yaml"
    if not (workdir / "out" / "report.json").exists() or not path.exists():
        path.write_text(yaml.safe_dump(doc))
        done = subprocess.run(
            [sys.executable, "-m", "kubetune.cli", "run", str(path), "--no-progress"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            sys.exit(f"error: training failed: {done.stderr[-2000:]}")
    loaded = manifests.load_file(path)
    return local.build_config(loaded.jobs[0], path, output=None, max_steps=None), workdir / "out"


def with_load(config: api.TrainerConfig, load: api.LoadProfileSpec) -> api.TrainerConfig:
    spec = config.spec.model_copy(update={"staging": api.StagingSpec(gpus=0, load=load)})
    return config.model_copy(update={"spec": spec})


def warm_up(target: str, model: str, tokens: int, prompt: str, requests: int = 4) -> None:
    """A few concurrent requests before the clock starts (the first ones pay one-off costs)."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True}

    def one(_: int) -> None:
        request = urllib.request.Request(
            f"{target}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()

    with ThreadPoolExecutor(requests) as pool:
        list(pool.map(one, range(requests)))
    one(0)  # and alone: a batch of one is another shape for the engine


def error_line(log: Path) -> str:
    """The line of the engine's log that says why it stopped (for a pydantic error, the line
    under its header)."""
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    said = [i for i, x in enumerate(lines) if "Error" in x or "error" in x.split(" ", 1)[0]]
    if not said:
        return lines[-1] if lines else "no output"
    index = said[-1]
    if "validation error for" in lines[index] and index + 1 < len(lines):
        index += 1
    line = lines[index]
    return line if len(line) <= 240 else line[:237] + "..."


def start(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    venv = staging.vllm_venv()
    port = staging._free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    command = staging.engine_command(venv, [*args, "--host", "127.0.0.1", "--port", str(port)])
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return process, f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class Served:
    """One engine: its vLLM arguments and the model names it answers under."""

    label: str
    args: list[str]
    models: dict[str, str]  # row name -> served model name
    process: subprocess.Popen[bytes] | None = None
    target: str = ""
    error: str | None = None

    def log(self, workdir: Path) -> Path:
        """Where its engine's output goes."""
        return workdir / f"engine-{self.label.replace(' ', '_').replace(',', '')}.log"


def measure(
    config: api.TrainerConfig,
    target: str,
    model: str,
    tokenizer: Path,
    folder: Path,
    output_tokens: int,
) -> list[api.StagingResults]:
    folder.mkdir(parents=True, exist_ok=True)
    return staging.load_test(
        config,
        target=target,
        model=model,
        tokenizer_dir=tokenizer,
        workdir=folder,
        output_tokens=output_tokens,
    )


def median_result(runs: list[api.StagingResults]) -> api.StagingResults:
    """Each figure's median over the rounds (requests summed); a round in which no request
    finished (one stalled past the level's time) has no figures, and is left out."""
    runs = [r for r in runs if r.requests] or runs

    def med(name: str) -> float | None:
        values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        return statistics.median(values) if values else None

    return api.StagingResults(
        level=runs[0].level,
        requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs),
        ttftP50Ms=med("ttftP50Ms"),
        ttftP95Ms=med("ttftP95Ms"),
        itlP50Ms=med("itlP50Ms"),
        itlP95Ms=med("itlP95Ms"),
        outputTokensPerSecond=med("outputTokensPerSecond"),
        outputTokens=sum(r.outputTokens or 0 for r in runs),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="LoRA steps of the quickstart")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="levels")
    parser.add_argument("--seconds", type=int, default=15, help="each level, each round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--output-tokens", type=int, default=32, help="tokens every request generates"
    )
    parser.add_argument("--out", type=Path, help="keep the work folder here (or reuse its run)")
    args = parser.parse_args()
    os.environ.setdefault(staging.VLLM_ENV, str(ROOT / ".tools" / "vllm"))
    os.environ.setdefault(staging.GUIDELLM_ENV, str(staging.vllm_venv() / "bin" / "guidellm"))
    load = api.LoadProfileSpec(
        type="concurrency",
        concurrency=args.concurrency,
        durationSeconds=args.seconds,
        maxPrompts=64,
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        workdir = args.out or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        trained, out = train(workdir, args.steps)
        config = with_load(trained, load)
        base = str(ROOT / "examples" / "demo-model")
        tokenizer = out / "tokenizer" if (out / "tokenizer").exists() else Path(base)
        prompt = staging.test_prompts(config, tokenizer, workdir)[0]["prompt"]
        lora = ["--served-model-name", st.BASE_MODEL, "--enable-lora"]
        lora += ["--lora-modules", f"{st.SERVED_MODEL}=" + str(out / "adapter")]
        lora += ["--max-lora-rank", "16"]
        gguf = out / "quantized" / "gguf-q8_0" / api.GGUF_FILE
        fp8 = ["--quantization", "fp8_per_channel"]
        engines = [
            Served(
                "base + adapter",
                [base, *lora],
                {"base": st.BASE_MODEL, "tuned (adapter)": st.SERVED_MODEL},
            ),
            Served(
                "merged",
                [str(out / "merged"), "--served-model-name", "m"],
                {"tuned (merged)": "m"},
            ),
            Served(
                "merged, vLLM fp8",
                [str(out / "merged"), "--served-model-name", "m", *fp8],
                {"tuned (merged), vLLM online fp8": "m"},
            ),
            Served(
                "gguf-q8_0 export",
                [str(gguf), "--tokenizer", str(tokenizer), "--served-model-name", "m"],
                {"tuned, gguf-q8_0 export": "m"},
            ),
            Served(
                "int8 export",
                [str(out / "quantized" / "int8"), "--served-model-name", "m"],
                {"tuned, int8 export (bitsandbytes)": "m"},
            ),
        ]
        runs: dict[str, list[list[api.StagingResults]]] = {}
        try:
            for e in engines:
                print(f"[bench] vllm serve {' '.join(e.args)}", file=sys.stderr, flush=True)
                e.process, e.target = start(e.args, e.log(workdir))
            for e in engines:
                assert e.process is not None
                process = e.process
                try:
                    staging.wait_ready(e.target, 1200, alive=lambda p=process: p.poll() is None)
                except InfraError:
                    e.error = error_line(e.log(workdir))
                    print(f"[bench] {e.label}: {e.error}", file=sys.stderr, flush=True)
                    stop(process)
                    continue
                for model in e.models.values():
                    warm_up(e.target, model, args.output_tokens, prompt)
            order = [
                (e, name, model) for e in engines if not e.error for name, model in e.models.items()
            ]
            for index in range(args.rounds):
                for e, name, model in order if index % 2 == 0 else order[::-1]:
                    folder = workdir / "load" / f"{index}-{name}".replace(" ", "_")
                    try:
                        levels = measure(
                            config, e.target, model, tokenizer, folder, args.output_tokens
                        )
                    except InfraError as exc:  # one lost round: say so, keep the others
                        print(f"[bench] {index + 1} {name}: {exc}", file=sys.stderr, flush=True)
                        continue
                    runs.setdefault(name, []).append(levels)
                    for level in levels:
                        print(
                            f"[bench] {index + 1} {name}, {level.level}: {st.describe(level)}",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            for e in engines:
                if e.process is not None:
                    stop(e.process)
    print_tables(args, engines, runs, time.time() - started)
    return 0


def print_tables(
    args: argparse.Namespace,
    engines: list[Served],
    runs: dict[str, list[list[api.StagingResults]]],
    took: float,
) -> None:
    def ratio(value: float | None, ref: float | None) -> str:
        return f"{value / ref:.2f}x" if value and ref else "-"

    results = {
        name: [median_result([r[i] for r in rounds]) for i in range(len(rounds[0]))]
        for name, rounds in runs.items()
    }

    def spread(name: str, index: int) -> str:
        rates = [r[index].outputTokensPerSecond or 0 for r in runs[name]]
        return f"{min(rates):.0f}-{max(rates):.0f}"

    print(
        f"vLLM (CPU), all engines side by side, {args.rounds} interleaved rounds (medians), "
        f"{args.seconds}s per level, test-split prompts, {args.output_tokens} output tokens per "
        f"request (ignore_eos); demo model, {args.steps} LoRA steps; {took:.0f}s in all"
    )
    if "base" in results:
        for index, ref in enumerate(results["base"]):
            print(f"\nload: {ref.level}\n")
            head = "| model | requests | out tok/req | TTFT p50 ms | TTFT p95 ms | ITL p95 ms |"
            head += " output tok/s | TTFT p50 vs base | TTFT p95 vs base | ITL p95 vs base |"
            head += " tok/s vs base | tok/s of each round |"
            print(head)
            print("|" + "---|" * 12)
            for name, levels in results.items():
                r = levels[index]
                per = (r.outputTokens or 0) / r.requests if r.requests else 0
                print(
                    f"| {name} | {r.requests} | {per:.1f} | {r.ttftP50Ms or 0:.1f} | "
                    f"{r.ttftP95Ms or 0:.1f} | {r.itlP95Ms or 0:.1f} | "
                    f"{r.outputTokensPerSecond or 0:.1f} | "
                    f"{ratio(r.ttftP50Ms, ref.ttftP50Ms)} | {ratio(r.ttftP95Ms, ref.ttftP95Ms)} | "
                    f"{ratio(r.itlP95Ms, ref.itlP95Ms)} | "
                    f"{ratio(r.outputTokensPerSecond, ref.outputTokensPerSecond)} | "
                    f"{spread(name, index)} |"
                )
    failed = [e for e in engines if e.error]
    if failed:
        print("\nnot served (vLLM's error line):\n")
        for e in failed:
            print(f"- {e.label}: `{e.error}`")


if __name__ == "__main__":
    sys.exit(main())
