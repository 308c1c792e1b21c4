"""Measure one training step's peak memory on CPU, with the trainer's own model code.

    python -m tests.support.plan_memory MODEL_DIR SPEC_JSON   ->  prints {"peakBytes": N}

Peak = the bytes of every tensor the model and AdamW hold (counted on the real objects after
a warm-up step) + the growth of the process's high-water RSS during a second step (activations,
gradients, temporaries). The warm-up step makes torch's kernels, thread pools and the
optimizer state resident first, and the high-water mark is reset after it (Linux clear_refs),
so neither library code nor the transient copy of the weights while loading is counted.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from types import SimpleNamespace


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(model_dir: str, spec_json: str) -> None:
    import torch

    from kubetune import api
    from kubetune_trainer import model as model_stage
    from kubetune_trainer import packing
    from kubetune_trainer import train as train_stage

    torch.set_num_threads(1)
    spec = api.FineTuneJobSpec.model_validate_json(spec_json)
    device = torch.device("cpu")
    model = model_stage.load_base(Path(model_dir), spec, device)
    model = model_stage.apply_method(model, spec)
    optimizer, _ = train_stage.build_optimizer(model, spec.training, 10)
    rows, length = spec.training.batchSize, spec.dataset.maxSeqLength
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    # The trainer's own batch path: packed rows of maxSeqLength tokens, every one a target
    # (the planner's upper bound), flat collate with per-sample attention, its loss.
    model_stage.set_attention(model, model_stage.attention_for(device))

    def step() -> None:
        samples = [
            SimpleNamespace(input_ids=ids, labels=ids)
            for ids in torch.randint(3, vocab, (rows, length), generator=generator).tolist()
        ]
        batch = packing.collate(samples, [[r] for r in range(rows)], pad_id=0, mode="flat")
        loss = train_stage._loss_sum(model, dict(batch.inputs))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    gc.collect()
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    held += sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    trainable, total = model_stage.count_parameters(model)
    peak = held + _rss("VmHWM") - before
    print(json.dumps({"peakBytes": peak, "trainable": trainable, "total": total}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
