"""GPU check: IncreLoRA training in bf16 autocast against fp32, with throughput and memory.

    python benchmarks/gpu_check.py                          # MiniLM (the default job's model)
    python benchmarks/gpu_check.py --model <path or hub id> --batch-size 32 --seq-len 128
    python benchmarks/gpu_check.py --device cpu --steps 2   # the logic, on a machine without GPU

Two checks on one CUDA device (exit status 0: both pass; 1: a tolerance is exceeded;
2: no CUDA device):

1. Agreement. fp32 and bf16-autocast runs start from the same weights and see the same
   batches for ``--compare-steps`` AdamW steps, with a growth round at step 2 in which every
   module gains a rank (so the new-rank path is compared too). Tolerances: per-step losses
   within 2e-2 relative (bf16 keeps 8 bits of mantissa, ~4e-3 per rounding, accumulated over
   the layers); the adapter update after the last step, ``||dW_bf16 - dW_fp32||_F /
   ||dW_fp32||_F`` over all modules together, within 1e-1 (the gradients carry ~1% bf16
   noise and Adam's first steps are nearly sign-like, so entries whose gradient is near zero
   may step the other way; a real precision bug, e.g. scores from scaled or bf16-rounded
   gradients, is off by far more); identical growth decisions; adapter parameters stay
   fp32; every score and loss is finite.
2. Throughput and peak memory. ``--steps`` timed optimizer steps (after ``--warmup``) in fp32
   and in bf16 autocast, growth schedule derived for the run; reports steps/s, tokens/s and
   ``torch.cuda.max_memory_allocated`` (n/a on CPU).

Inputs are random token ids (content does not change the cost) with random binary labels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

LOSS_RTOL = 2e-2
UPDATE_RTOL = 1e-1


@dataclass
class Throughput:
    precision: str
    steps_per_s: float
    tokens_per_s: float
    peak_memory_mib: float | None
    final_total_rank: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="alias, local folder or hub id")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (logic check)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--target-rank", type=float, default=2.0)
    parser.add_argument("--compare-steps", type=int, default=4, help="steps of check 1 (>= 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before check 2")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of check 2")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.compare_steps < 3:
        parser.error("--compare-steps must be >= 3 (the growth round is at step 2)")
    return args


def require_device(name: str) -> torch.device:
    """The device, or SystemExit(2) with a clear message when CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False; torch"
            f" {torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a GPU"
            " machine, or pass --device cpu for a logic check.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return device


def load_model(name: str, device: torch.device) -> torch.nn.Module:
    """The pretrained model with a seeded classification head (identical on every call)."""
    from transformers import AutoModelForSequenceClassification

    from increlora.assets import resolve_model

    resolved = resolve_model(name)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolved.path, num_labels=2, **resolved.pretrained_kwargs()
    )
    return model.to(device)


def batches(vocab_size: int, args: argparse.Namespace, device: torch.device) -> Iterator:
    """Seeded random batches, the same sequence for every run."""
    g = torch.Generator().manual_seed(1)
    while True:
        ids = torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=g)
        labels = torch.randint(0, 2, (args.batch_size,), generator=g)
        yield {"input_ids": ids.to(device), "labels": labels.to(device)}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def setup(
    args: argparse.Namespace, device: torch.device, total_steps: int, one_round: bool
) -> tuple[Any, torch.optim.Optimizer, Any]:
    """Fresh model and adapter: (adapted, optimizer, controller).

    ``one_round``: a single growth round at step 2 in which every module gains a rank
    (check 1); otherwise the schedule is derived from ``total_steps`` as in a real run.
    """
    import increlora
    from increlora.injection import find_targets

    model = load_model(args.model, device)
    head = [name for name in ("classifier", "score") if hasattr(model, name)]
    config = increlora.IncreLoRAConfig(target_rank=args.target_rank, modules_to_save=head)
    if one_round:
        modules = len(find_targets(model, config))
        config = increlora.IncreLoRAConfig(
            target_rank=2, modules_to_save=head, init_warmup=1, interval=2, top_h=modules
        )
    adapted = increlora.inject(model, config)
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-3, weight_decay=0.01)
    controller = adapted.controller(optimizer, total_steps=total_steps)
    return adapted, optimizer, controller


def train_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    controller: Any,
    device: torch.device,
    precision: str,
) -> float:
    with autocast(device, precision):
        loss = model(**batch).loss.float() + controller.regularization_loss()
    loss.backward()
    optimizer.step()
    controller.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def compare(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Check 1: the same steps from the same weights in fp32 and in bf16 autocast."""
    losses: dict[str, list[float]] = {}
    updates: dict[str, dict[str, torch.Tensor]] = {}
    grown: dict[str, list[list[str]]] = {}
    for precision in ("fp32", "bf16"):
        adapted, optimizer, controller = setup(args, device, args.compare_steps + 1, True)
        data = batches(adapted.model.config.vocab_size, args, device)
        losses[precision] = [
            train_step(adapted.model, next(data), optimizer, controller, device, precision)
            for _ in range(args.compare_steps)
        ]
        with torch.no_grad():
            updates[precision] = {
                name: layer.delta_weight().float().cpu() for name, layer in adapted.layers.items()
            }
        # Sets: with top_h = every module the order within the round is only the score order.
        grown[precision] = [sorted(g["module"] for g in e["grown"]) for e in controller.history]
        scores = [s for e in controller.history for s in e["scores"].values()]
        if not all(math.isfinite(x) for x in scores + losses[precision]):
            raise RuntimeError(f"{precision}: non-finite loss or importance score")
        dtypes = {p.dtype for p in adapted.trainable_parameters()}
        if dtypes != {torch.float32}:
            raise RuntimeError(f"{precision}: adapter parameters are {dtypes}, not fp32")
        del adapted, optimizer, controller
    loss_error = max(
        abs(b - f) / max(abs(f), 1e-12) for f, b in zip(losses["fp32"], losses["bf16"])
    )
    diff = sum(float((updates["bf16"][n] - u).pow(2).sum()) for n, u in updates["fp32"].items())
    norm = sum(float(u.pow(2).sum()) for u in updates["fp32"].values())
    update_error = math.sqrt(diff / norm) if norm > 0 else 0.0
    growth_same = grown["fp32"] == grown["bf16"] and len(grown["fp32"]) == 1
    return {
        "losses": losses,
        "loss_rel_error": loss_error,
        "update_rel_error": update_error,
        "growth_same": growth_same,
        "passed": loss_error <= LOSS_RTOL and update_error <= UPDATE_RTOL and growth_same,
    }


def throughput(args: argparse.Namespace, device: torch.device, precision: str) -> Throughput:
    """Check 2: timed steps with the growth schedule derived for the run."""
    adapted, optimizer, controller = setup(args, device, args.warmup + args.steps, False)
    data = batches(adapted.model.config.vocab_size, args, device)
    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        train_step(adapted.model, next(data), optimizer, controller, device, precision)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(adapted.model, next(data), optimizer, controller, device, precision)
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return Throughput(
        precision,
        args.steps / elapsed,
        args.steps * args.batch_size * args.seq_len / elapsed,
        peak,
        controller.total_rank,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = require_device(args.device)
    agreement = compare(args, device)
    runs = [throughput(args, device, p) for p in ("fp32", "bf16")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; model: {args.model}; batch {args.batch_size} x {args.seq_len}")
    print(
        f"bf16 vs fp32 over {args.compare_steps} steps: loss rel. error"
        f" {agreement['loss_rel_error']:.2e} (tol {LOSS_RTOL:g}), adapter update rel. error"
        f" {agreement['update_rel_error']:.2e} (tol {UPDATE_RTOL:g}), same growth:"
        f" {agreement['growth_same']} -> {'PASS' if agreement['passed'] else 'FAIL'}"
    )
    for run in runs:
        memory = f"{run.peak_memory_mib:.0f} MiB" if run.peak_memory_mib is not None else "n/a"
        print(
            f"{run.precision}: {run.steps_per_s:.2f} steps/s, {run.tokens_per_s:.0f} tokens/s,"
            f" peak memory {memory}, total rank {run.final_total_rank}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": name, "agreement": agreement, "runs": [asdict(r) for r in runs]},
                f,
                indent=2,
            )
    return 0 if agreement["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
