"""Serving latency and throughput: base vs tuned (LoRA adapter on the base) vs tuned (merged),
under the same load, in one run, on vLLM (CPU) with guidellm.

    python benchmarks/staging_serving.py [--steps 30] [--rate 2] [--seconds 20] [--out DIR]

Trains the quickstart (examples/quickstart.yaml, `--steps` LoRA steps, mergeAdapter on), then
starts vLLM twice from .tools/vllm (scripts/install-vllm.sh): once with the base model and the
adapter as a LoRA module (served as `base` and `tuned`), once with the merged model. The same
guidellm Poisson load of test-split prompts (each asking for its real completion length) goes
to base, adapter and merged in turn; the table gives each one's TTFT, ITL and output tokens/s
and the ratio against base. The engines share this machine with nothing else of ours; on a
busy machine rerun and compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "trainer-image")]

from kubetune import api, manifests  # noqa: E402
from kubetune import staging as st  # noqa: E402
from kubetune_trainer import local, staging  # noqa: E402


def train(workdir: Path, steps: int, rate: float, seconds: int) -> tuple[api.TrainerConfig, Path]:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = doc["spec"]
    spec["model"]["source"] = str(ROOT / "examples" / "demo-model")
    spec["dataset"]["source"] = str(ROOT / "examples" / "data" / "quickstart.jsonl")
    spec["output"] = {"destination": str(workdir / "out"), "mergeAdapter": True}
    spec["evaluation"] = {"maxSamples": 4, "maxNewTokens": 2, "metrics": ["loss"]}
    spec["training"].pop("epochs", None)
    spec["training"]["maxSteps"] = steps
    path = workdir / "job.yaml"
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
    config = local.build_config(loaded.jobs[0], path, output=None, max_steps=None)
    load = api.LoadProfileSpec(type="poisson", rate=rate, durationSeconds=seconds, maxPrompts=64)
    spec = config.spec.model_copy(update={"staging": api.StagingSpec(gpus=0, load=load)})
    return config.model_copy(update={"spec": spec}), workdir / "out"


def engine(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    venv = staging.vllm_venv()
    port = staging._free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    command = staging.engine_command(venv, [*args, "--host", "127.0.0.1", "--port", str(port)])
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    target = f"http://127.0.0.1:{port}"
    staging.wait_ready(target, 600, alive=lambda: process.poll() is None)
    return process, target


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def measure(
    config: api.TrainerConfig, target: str, model: str, tokenizer: Path, workdir: Path
) -> api.StagingResults:
    folder = workdir / model
    folder.mkdir(exist_ok=True)
    (level,) = staging.load_test(
        config, target=target, model=model, tokenizer_dir=tokenizer, workdir=folder
    )
    return level


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="LoRA steps of the quickstart")
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson requests per second")
    parser.add_argument("--seconds", type=int, default=20, help="load per model")
    parser.add_argument("--out", type=Path, help="keep the work folder here")
    args = parser.parse_args()
    os.environ.setdefault(staging.VLLM_ENV, str(ROOT / ".tools" / "vllm"))
    os.environ.setdefault(staging.GUIDELLM_ENV, str(staging.vllm_venv() / "bin" / "guidellm"))
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        workdir = args.out or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        config, out = train(workdir, args.steps, args.rate, args.seconds)
        base, adapter, merged = (
            str(ROOT / "examples" / "demo-model"),
            out / "adapter",
            out / "merged",
        )
        tokenizer = out / "tokenizer" if (out / "tokenizer").exists() else Path(base)
        results: dict[str, api.StagingResults] = {}
        lora = ["--served-model-name", st.BASE_MODEL, "--enable-lora"]
        lora += ["--lora-modules", f"{st.SERVED_MODEL}={adapter}", "--max-lora-rank", "16"]
        process, target = engine([base, *lora], workdir / "engine-lora.log")
        try:
            results["base"] = measure(config, target, st.BASE_MODEL, tokenizer, workdir)
            results["tuned (adapter)"] = measure(
                config, target, st.SERVED_MODEL, tokenizer, workdir
            )
        finally:
            stop(process)
        process, target = engine(
            [str(merged), "--served-model-name", "merged"], workdir / "engine-merged.log"
        )
        try:
            results["tuned (merged)"] = measure(config, target, "merged", tokenizer, workdir)
        finally:
            stop(process)
    ref = results["base"]

    def ratio(value: float | None, base_value: float | None) -> str:
        return f"{value / base_value:.2f}x" if value and base_value else "-"

    print(
        f"vLLM {args.rate:g} req/s Poisson, {args.seconds}s per model, test-split prompts "
        f"(demo model, {args.steps} LoRA steps; {time.time() - started:.0f}s in all)"
    )
    head = "| model | requests | TTFT p50 ms | TTFT p95 ms | ITL p95 ms | output tok/s |"
    head += " TTFT p95 vs base | tok/s vs base |"
    print(head)
    print("|" + "---|" * 8)
    for name, r in results.items():
        print(
            f"| {name} | {r.requests} | {r.ttftP50Ms or 0:.1f} | {r.ttftP95Ms or 0:.1f} | "
            f"{r.itlP95Ms or 0:.1f} | {r.outputTokensPerSecond or 0:.1f} | "
            f"{ratio(r.ttftP95Ms, ref.ttftP95Ms)} | "
            f"{ratio(r.outputTokensPerSecond, ref.outputTokensPerSecond)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
