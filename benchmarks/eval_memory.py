"""Peak memory of evaluate_model does not grow with the test set (issue 5). Not a timed test.

    .venv/bin/python benchmarks/eval_memory.py                  # N=64 and 10N=640 rows
    .venv/bin/python benchmarks/eval_memory.py --rows 32 --device cuda

Each (mode, rows) pair runs in a fresh process, so one run's peak cannot hide another's. In that
process the demo model (examples/demo-model, a tiny Llama) and the rows (examples/data/
quickstart.jsonl: the first N rows, repeated) are loaded first; then the resident set size is
read after a warm-up pass over the N distinct rows, evaluate_model runs, and the growth is the
peak RSS during the run (sampled every 2 ms) minus that baseline (on CUDA also
torch.cuda.max_memory_allocated). Two modes:

- ``kubetune``: evaluate_model with every metric (loss, perplexity, tokenAccuracy, exactMatch,
  rougeL);
- ``hold-logits``: the counterfactual the design forbids, which keeps every batch's logits and
  reduces them at the end. It shows that the benchmark can see growth when there is some.

The printed ratio is peak(10N) / peak(N) (RSS; CUDA allocated on a GPU): ~1.0 means memory
independent of test-set size.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "demo-model"
DATA = ROOT / "examples" / "data" / "quickstart.jsonl"
MAX_SEQ_LENGTH = 256


def load_rows(count: int, unique: int) -> list[Any]:
    """``count`` rows cycling through the first ``unique`` lines: the large set then has the
    same length distribution as the small one (the longest row sets the largest batch, and
    that is allowed to cost memory; the number of rows is not)."""
    from kubetune_trainer.data import parse_row

    lines = DATA.read_text().splitlines()[:unique]
    rows = []
    for i in range(count):
        value = json.loads(lines[i % len(lines)])
        value["id"] = f"{value.get('id', 'row')}-{i}"  # distinct rows, same shape
        example = parse_row(i + 1, value, "alpaca", {})
        assert not isinstance(example, str), example
        rows.append(example)
    return rows


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakSampler:
    """Highest RSS seen while the block runs (sampled every 2 ms in a thread): the process-wide
    ru_maxrss would also count the warm-up."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def hold_logits(model: Any, tokenizer: Any, rows: list[Any], batch_size: int, device: str) -> float:
    """The forbidden way: keep every logit, reduce at the end (loss only)."""
    import torch
    import torch.nn.functional as F

    from kubetune_trainer.data import encode
    from kubetune_trainer.evaluate import pad_token_id

    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            encoded = [
                encode(r, tokenizer, MAX_SEQ_LENGTH) for r in rows[start : start + batch_size]
            ]
            width = max(len(e.input_ids) for e in encoded)
            pad = pad_token_id(tokenizer)
            ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in encoded])
            labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in encoded])
            mask = (ids != pad).long()
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            kept.append((logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)))
        all_logits = torch.cat([k[0] for k in kept])
        all_labels = torch.cat([k[1] for k in kept]).to(all_logits.device)
        return float(F.cross_entropy(all_logits.float(), all_labels, ignore_index=-100))


def child(
    mode: str, rows_wanted: int, unique: int, batch_size: int, device: str, threads: int
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune import api
    from kubetune_trainer.evaluate import evaluate_model

    torch.set_num_threads(threads)
    model: Any = AutoModelForCausalLM.from_pretrained(MODEL)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    rows = load_rows(rows_wanted, unique)
    spec = api.EvaluationSpec(batchSize=batch_size, maxNewTokens=8)
    # Warm up with one pass over the distinct rows (N of them): one-time allocations (kernels,
    # allocator pools for these shapes) land in the baseline, for both set sizes alike.
    warm = evaluate_model(
        model, tokenizer, rows[:unique], spec, max_seq_length=MAX_SEQ_LENGTH, device=device
    )
    del warm
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline_alloc = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    baseline = rss_bytes()
    sampler = PeakSampler()
    start = time.perf_counter()
    with sampler:
        if mode == "kubetune":
            result: Any = evaluate_model(
                model, tokenizer, rows, spec, max_seq_length=MAX_SEQ_LENGTH, device=device
            )
        else:
            result = {"loss": hold_logits(model, tokenizer, rows, batch_size, device)}
    seconds = time.perf_counter() - start
    peak = sampler.peak
    out = {
        "mode": mode,
        "rows": rows_wanted,
        "seconds": round(seconds, 2),
        "baseline_rss_mib": round(baseline / 2**20, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "growth_rss_mib": round(max(peak - baseline, 0) / 2**20, 1),
        "metrics": {k: round(v, 4) for k, v in result.items()},
    }
    if device.startswith("cuda"):
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["growth_cuda_mib"] = round(
            (torch.cuda.max_memory_allocated() - baseline_alloc) / 2**20, 1
        )
    print(json.dumps(out))


def run(mode: str, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--rows",
        str(rows),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{mode} with {rows} rows failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="N: the small test set")
    parser.add_argument("--factor", type=int, default=10, help="the large set is factor * N")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="kubetune,hold-logits")
    parser.add_argument("--unique", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["kubetune", "hold-logits"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(
            args.child,
            args.rows,
            args.unique or args.rows,
            args.batch_size,
            args.device,
            args.threads,
        )
        return

    sizes = [args.rows, args.rows * args.factor]
    cuda = args.device.startswith("cuda")
    peak_key = "peak_cuda_mib" if cuda else "peak_rss_mib"
    header = f"{'mode':<12} {'rows':>6} {'seconds':>8} {'peak RSS MiB':>13} {'RSS growth MiB':>15}"
    print(header + (f" {'peak CUDA MiB':>14}" if cuda else ""))
    for mode in args.modes.split(","):
        results = [run(mode, n, args) for n in sizes]
        for r in results:
            line = (
                f"{mode:<12} {r['rows']:>6} {r['seconds']:>8} {r['peak_rss_mib']:>13} "
                f"{r['growth_rss_mib']:>15}"
            )
            print(line + (f" {r['peak_cuda_mib']:>14}" if cuda else ""))
        ratio = results[1][peak_key] / results[0][peak_key]
        name = "CUDA allocated" if cuda else "RSS"
        print(f"{mode:<12} peak {name} ratio {sizes[1]}/{sizes[0]} rows: {ratio:.2f}")
        print(json.dumps({"mode": mode, "peak_ratio": round(ratio, 3), "runs": results}))


if __name__ == "__main__":
    main()
