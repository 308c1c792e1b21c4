"""Quantized inference exports of the quickstart's fine-tune (issue 11): size, quality and speed
of each output.quantize format against the unquantized merged model, measured in the same run.

    .venv/bin/python benchmarks/quantize_exports.py                  # the quickstart, 800 steps
    .venv/bin/python benchmarks/quantize_exports.py --max-steps 100  # quicker, weaker model

It runs examples/quickstart.yaml as `kubetune run` does (same model, data, LoRA, seed), with
`output.quantize` set to every format and the safety evals left out (the table is about the
test split), then prints report.json's quantization section as a markdown table: weights on
disk, exact match and loss on the 71-row test split with their change against the merged
model, latency p50/p95 (ms per answer, batch size 1, test-split prompts, up to maxNewTokens)
and generated tokens/s, plus size and tokens/s as ratios to the merged model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "examples" / "quickstart.yaml"


def table(section: dict[str, Any]) -> str:
    ref = section["reference"]
    lines = [
        "| format | size MB | size vs merged | exactMatch | delta | loss | delta | p50 ms | p95 ms "
        "| tokens/s | tokens/s vs merged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, r: dict[str, Any], delta: dict[str, float] | None) -> str:
        m, tps = r["metrics"], r["generationTokensPerSecond"]
        cells = [
            name,
            f"{r['sizeBytes'] / 1e6:.2f}",
            f"{r['sizeBytes'] / ref['sizeBytes']:.2f}x",
            f"{m['exactMatch']:.3f}",
            f"{delta['exactMatch']:+.3f}" if delta else "",
            f"{m['loss']:.3f}",
            f"{delta['loss']:+.4f}" if delta else "",
            f"{r['latencyP50Ms']:.1f}",
            f"{r['latencyP95Ms']:.1f}",
            f"{tps:.1f}",
            f"{tps / ref['generationTokensPerSecond']:.2f}x",
        ]
        return "| " + " | ".join(cells) + " |"

    lines.append(row("merged (float32)", ref, None))
    notes = []
    for export in section["exports"]:
        if export["produced"]:
            lines.append(row(export["format"], export, export["delta"]))
            notes += [f"{export['format']}: {n}" for n in export["notes"]]
        else:
            lines.append(f"| {export['format']} | not produced |" + " |" * 9)
            notes.append(f"{export['format']}: cannot be produced: {export['reason']}")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=None, help="cap training steps")
    parser.add_argument("--output", type=Path, default=None, help="keep the run here")
    parser.add_argument("--json", type=Path, default=None, help="also write the section here")
    args = parser.parse_args()

    from kubetune import api, manifests
    from kubetune_trainer.__main__ import Options, run
    from kubetune_trainer.local import build_config

    job = manifests.load_file(MANIFEST).jobs[0]
    with tempfile.TemporaryDirectory(prefix="kubetune-quantize-bench-") as tmp:
        out = args.output or Path(tmp) / "out"
        config = build_config(job, MANIFEST, output=str(out), max_steps=args.max_steps)
        spec = config.spec.model_copy(deep=True)
        spec.evaluation.safety = None
        spec.output.quantize = list(api.QUANTIZE_FORMATS)
        config = config.model_copy(update={"spec": spec})
        result = run(config, Options(metrics_port=0, termination_log=None, log=print))
        section = result.report["quantization"]
    if args.json:
        args.json.write_text(json.dumps(section, indent=1))
    metrics = result.status.metrics or api.Metrics()
    print(
        f"\nquickstart LoRA, {result.report['training']['steps']} steps; test split exactMatch "
        f"base {metrics.base.get('exactMatch')} -> tuned {metrics.tuned.get('exactMatch')}\n"
    )
    print(table(section))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: nothing measured") from None
