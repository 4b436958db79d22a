"""IncreLoRA's training-step time and peak memory as ratios to plain LoRA, measured together.

    python benchmarks/step_time.py                    # MiniLM, batch 32, length 64, rank 2
    python benchmarks/step_time.py --importance paper --steps 20

Plain LoRA is PEFT's LoRA at the same average rank on the same modules (the paper's six
module types per layer). IncreLoRA is measured in two states: *during growth* (reserve ranks
live, importance scored every step, below-budget ranks) and *after growth* (budget reached,
reserve dropped, no scoring). Time: the configurations are interleaved in short blocks in one
process, so machine noise hits all of them alike; medians are reported. Memory: each
configuration runs alone in a fresh subprocess and reports its peak RSS; the ratio is taken
over the training part (peak minus the RSS after loading the model). Inputs are random token
ids: content does not change the cost. Targets (issue #2): <= 1.15x during growth, <= 1.03x
after growth, memory <= 1.10x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = ("lora", "increlora-growing", "increlora-grown")
TARGETS = {"increlora-growing": 1.15, "increlora-grown": 1.03}


def build(name: str, args: argparse.Namespace):
    """Model + optimizer + per-step callable for one configuration."""
    from transformers import AutoModelForSequenceClassification

    import increlora
    from increlora.assets import resolve_model
    from increlora.injection import TARGET_PRESETS

    resolved = resolve_model(args.model)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolved.path,
        num_labels=2,
        **({"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}),
    )
    targets = TARGET_PRESETS[model.config.model_type]
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=int(args.target_rank),
                lora_alpha=16,
                target_modules=targets,
                modules_to_save=["classifier"],
            ),
        )
        params = [p for p in model.parameters() if p.requires_grad]
        controller = None
    else:
        growing = name == "increlora-growing"
        config = increlora.IncreLoRAConfig(
            target_modules=targets,
            modules_to_save=["classifier"],
            target_rank=args.target_rank,
            importance=args.importance,
            # growing: the first round is far away, so every measured step scores and keeps
            # its reserve; grown: every module gains rank each step until the budget.
            init_warmup=10**6 if growing else 0,
            interval=10**6 if growing else 1,
        )
        adapted = increlora.inject(model, config)
        config.top_h = len(adapted.layers)
        params = adapted.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    if name != "lora":
        total = 10**7 if name == "increlora-growing" else 10**4
        controller = adapted.controller(optimizer, total_steps=total)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.length), generator=g)
    labels = torch.randint(0, 2, (args.batch,), generator=g)
    model.train()

    def step() -> None:
        loss = model(input_ids=ids, labels=labels).loss
        if controller is not None:
            loss = loss + controller.regularization_loss()
        loss.backward()
        optimizer.step()
        if controller is not None:
            controller.step()
        optimizer.zero_grad(set_to_none=True)

    if name == "increlora-grown":
        while controller.growing:  # grow to the budget before measuring
            step()
    return step, controller


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(name: str, args: argparse.Namespace) -> dict:
    """Runs in a fresh subprocess: peak RSS of training above the RSS after loading.

    Loading a checkpoint peaks higher than a training step, so the peak is reset first
    (writing 5 to /proc/self/clear_refs resets VmHWM, Linux >= 4.0).
    """
    step, _ = build(name, args)
    step()  # first step allocates optimizer state: part of training memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    loaded = _status_kib("VmRSS")
    for _ in range(args.memory_steps):
        step()
    peak = _status_kib("VmHWM")
    return {"loaded_kib": loaded, "peak_kib": peak, "training_kib": peak - loaded}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--target-rank", type=float, default=2.0)
    parser.add_argument("--importance", choices=["proxy", "paper"], default="proxy")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--block", type=int, default=3, help="steps per interleaved block")
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args)))
        return

    from tqdm import tqdm

    steps = {name: build(name, args)[0] for name in CONFIGS}
    for step in steps.values():  # warm-up: allocator caches, first-call overheads
        step()
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    blocks = max(1, args.steps // args.block)
    for _ in tqdm(range(blocks), desc="timing (interleaved blocks)"):
        for name in CONFIGS:
            for _ in range(args.block):
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    del steps

    memory = {}
    for name in tqdm(CONFIGS, desc="memory (one subprocess each)"):
        cmd = [sys.executable, __file__, "--memory-child", name] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])

    base_time = statistics.median(times["lora"])
    base_mem = memory["lora"]["training_kib"]
    print(
        f"\nmodel={args.model} batch={args.batch} length={args.length} rank={args.target_rank}"
        f" importance={args.importance} threads={args.threads} steps/config={len(times['lora'])}"
    )
    print(
        f"{'config':<20}{'median s/step':>14}{'time ratio':>12}{'train MiB':>11}{'mem ratio':>11}  target"
    )
    for name in CONFIGS:
        t = statistics.median(times[name])
        m = memory[name]["training_kib"]
        target = TARGETS.get(name)
        verdict = (
            ""
            if target is None
            else f"<= {target:.2f}x {'ok' if t / base_time <= target else 'MISSED'}"
        )
        print(
            f"{name:<20}{t:>14.3f}{t / base_time:>12.3f}{m / 1024:>11.1f}{m / max(base_mem, 1):>11.3f}"
            f"  {verdict}"
        )
    print(f"memory target: <= 1.10x (lora training peak {base_mem / 1024:.1f} MiB)")


if __name__ == "__main__":
    main()
