"""Adapter memory of IncreLoRA (dynamic and static storage) beside PEFT LoRA and PEFT AdaLoRA.

    python benchmarks/memory.py                         # MiniLM, SmolLM2-135M at ranks 2 and 8,
                                                        # + Llama-3-8B shapes on the meta device
    python benchmarks/memory.py --models minilm --ranks 2 --rss-steps 0   # counts only, fast

Three tables (issue 24, docs/memory.md):

1. **Adapter elements**, counted from the tensors themselves: adapter parameters (every
   ``lora_*`` tensor; task heads excluded), their gradients and the optimizer's state (AdamW:
   two moments), right after injection and once the budget is reached. IncreLoRA is driven to
   its budget for real (a round every step, every module chosen: the uniform allocation, which
   is what the count depends on); PEFT AdaLoRA keeps its ``init_r`` triplets stored whatever it
   masks, so its count does not change (its schedule reaches ``target_r`` by the last step;
   "in use" counts its unmasked triplets). The last column is stored / (4 x parameters in use).
2. **Peak process memory** of a short training run, each configuration in its own process:
   on CPU the peak RSS of the training steps alone (``VmHWM`` after resetting it through
   ``/proc/self/clear_refs`` once the model is loaded: loading peaks higher than training and
   would hide it), and the growth over the RSS before training; base model included, and the
   CPU allocator caches freed blocks, so read differences of a few MB as noise. With
   ``--device cuda``: ``torch.cuda.max_memory_allocated`` and its growth over what was
   allocated before training.
3. **Llama-3-8B shapes** (32 layers, hidden 4096, MLP 14336, GQA 8 KV heads; all seven linear
   modules adapted) built on the meta device: no weights, exact shapes. Static training memory
   = bf16 base weights + fp32 adapter parameters, gradients and two Adam moments (activations
   excluded). IncreLoRA "after the budget" grows every module uniformly to the average rank.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

METHODS = ("peft-lora", "peft-adalora", "increlora-static", "increlora-dynamic")


def load(model: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from increlora.assets import resolve_model

    resolved = resolve_model(model)
    gguf = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    torch.manual_seed(0)
    if model == "minilm":
        net = AutoModelForSequenceClassification.from_pretrained(resolved.path, num_labels=2)
    else:
        net = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32, **gguf)
    return net.to(device)


def adapter_tensors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


def count(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    params = adapter_tensors(model)
    state = 0
    if optimizer is not None:
        for p in params:
            state += sum(
                v.numel()
                for v in optimizer.state.get(p, {}).values()
                if torch.is_tensor(v) and v.dim()
            )
    return {
        "params": sum(p.numel() for p in params),
        "grads": sum(p.numel() for p in params),  # one gradient per parameter in a step
        "optimizer": state,
    }


def build(method: str, net: torch.nn.Module, rank: int, steps: int):
    """(model to call, optimizer, controller or None, elements in use: a function)."""
    import increlora
    from increlora.injection import TARGET_PRESETS

    kind = "bert" if net.config.model_type == "bert" else "llama"
    targets = TARGET_PRESETS[kind]
    head = ["classifier"] if kind == "bert" else []
    if method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(net, LoraConfig(r=rank, lora_alpha=16, target_modules=targets))
        in_use = lambda: sum(p.numel() for p in adapter_tensors(model))  # noqa: E731
    elif method == "peft-adalora":
        from peft import AdaLoraConfig, get_peft_model

        init_r = math.ceil(1.5 * rank)  # PEFT's default ratio (init_r 12, target_r 8)
        model = get_peft_model(
            net,
            AdaLoraConfig(
                init_r=init_r, target_r=rank, lora_alpha=16, target_modules=targets,
                tinit=0, tfinal=steps // 2, deltaT=1, total_step=steps,
            ),
        )  # fmt: skip

        def in_use() -> int:  # unmasked triplets (lora_E != 0) x (d_in + d_out + 1)
            total = 0
            for module in model.modules():
                if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
                    kept = int((module.lora_E["default"] != 0).sum())
                    a, b = module.lora_A["default"], module.lora_B["default"]
                    total += kept * (a.shape[1] + b.shape[0] + 1)
            return total
    else:
        storage = method.split("-")[1]
        config = increlora.IncreLoRAConfig(
            target_modules=targets, modules_to_save=head, target_rank=rank,
            init_warmup=2, interval=1, top_h=10**6, storage=storage,
        )  # fmt: skip
        adapted = increlora.inject(net, config)
        config.top_h = len(adapted.layers)
        model = net
        in_use = adapted.num_adapter_parameters
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    controller = None
    if method.startswith("increlora"):
        controller = adapted.controller(optimizer, total_steps=10 * steps)
    elif method == "peft-adalora":
        controller = model
    return model, optimizer, controller, in_use


def inputs(net: torch.nn.Module, batch: int, length: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 2000, (batch, length), generator=g).to(device)
    if net.config.model_type == "bert":
        return {"input_ids": ids, "labels": torch.zeros(batch, dtype=torch.long, device=device)}
    return {"input_ids": ids, "labels": ids}


def train_step(model, optimizer, controller, method: str, batch: dict, step: int) -> None:
    loss = model(**batch).loss
    if method.startswith("increlora"):
        loss = loss + controller.regularization_loss()
    loss.backward()
    optimizer.step()
    if method.startswith("increlora"):
        controller.step()
    elif method == "peft-adalora":
        controller.base_model.update_and_allocate(step)
    optimizer.zero_grad(set_to_none=True)


def elements_row(model_name: str, method: str, rank: int, args) -> dict:
    """Counts after injection (one step: moments exist) and once the budget is reached."""
    net = load(model_name)
    model, optimizer, controller, in_use = build(method, net, rank, args.budget_steps)
    batch = inputs(net, 2, 16, "cpu")
    train_step(model, optimizer, controller, method, batch, 0)
    start = count(model, optimizer)
    start_in_use = in_use()
    for step in range(1, args.budget_steps):
        if method.startswith("increlora") and not controller.growing:
            break
        train_step(model, optimizer, controller, method, batch, step)
    if method.startswith("increlora") and controller.growing:
        raise SystemExit(f"{method} did not reach its budget in {args.budget_steps} steps")
    end = count(model, optimizer)
    used = in_use()
    stored = end["params"] + end["grads"] + end["optimizer"]
    return {
        "model": model_name, "rank": rank, "method": method,
        "start": start, "start_in_use": start_in_use, "end": end, "in_use": used,
        "ratio": stored / (4 * used),
    }  # fmt: skip


def rss_child(model_name: str, method: str, rank: int, steps: int, device: str) -> None:
    """Runs in its own process: a short training run, prints peak memory as JSON."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    net = load(model_name, device)
    model, optimizer, controller, _ = build(method, net, rank, steps)
    batch = inputs(net, 8, 64, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_peak_rss()
    start = time.perf_counter()
    for step in range(steps):
        train_step(model, optimizer, controller, method, batch, step)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_bytes("VmHWM")
    print(json.dumps({"peak_bytes": peak, "before_bytes": before, "seconds": seconds}))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS (Linux: write 5 to /proc/self/clear_refs) so that the peak
    read after training is the training's, not the model loading's; returns the RSS now.
    Where that is not possible, the lifetime peak (ru_maxrss) is what gets reported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def meta_table(ranks: list[int]) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import increlora
    from increlora.injection import TARGET_PRESETS

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    )  # fmt: skip
    rows = []
    for rank in ranks:
        with torch.device("meta"):
            base = LlamaForCausalLM(config)
        n_base = sum(p.numel() for p in base.parameters())
        peft_model = get_peft_model(
            base, LoraConfig(r=rank, lora_alpha=16, target_modules=TARGET_PRESETS["llama"])
        )
        lora = sum(p.numel() for p in adapter_tensors(peft_model))
        result = {"rank": rank, "base": n_base, "peft-lora": lora}
        for storage in ("static", "dynamic"):
            with torch.device("meta"):
                net = LlamaForCausalLM(config)
            adapted = increlora.inject(
                net,
                increlora.IncreLoRAConfig(
                    target_modules=TARGET_PRESETS["llama"], target_rank=rank, storage=storage
                ),
            )
            injected = sum(p.numel() for p in adapter_tensors(net))
            for layer in adapted.layers.values():  # uniform growth to the average rank
                if rank > layer.active_rank:
                    layer.grow(rank - layer.active_rank, 0, None)
                layer.drop_reserve()
            result[f"increlora-{storage}"] = {
                "injected": injected,
                "budget": sum(p.numel() for p in adapter_tensors(net)),
                "in_use": adapted.num_adapter_parameters(),
            }
        rows.append(result)
    return rows


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2-135m"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--budget-steps", type=int, default=20)
    parser.add_argument("--rss-steps", type=int, default=5, help="0: skip the peak-memory runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-meta", action="store_true", help="skip the Llama-3-8B table")
    parser.add_argument("--no-elements", action="store_true", help="skip the element counts")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rss_child(args.child[0], args.child[1], int(args.child[2]), args.rss_steps, args.device)
        return

    if not args.no_elements:
        elements_table(args)
    if args.rss_steps:
        rss_table(args)
    if not args.no_meta:
        meta_print(args)


def elements_table(args) -> None:
    print("## Adapter elements (parameters + gradients + AdamW moments)\n")
    print(
        "| model | rank | method | after injection: params / +grads+Adam | budget reached:"
        " params / +grads+Adam | in use | stored / (4 x in use) |"
    )
    print("|---|---|---|---|---|---|---|")
    for model_name in args.models:
        for rank in args.ranks:
            for method in args.methods:
                r = elements_row(model_name, method, rank, args)
                s, e = r["start"], r["end"]
                print(
                    f"| {model_name} | {rank} | {method} | {s['params']:,} /"
                    f" {s['params'] + s['grads'] + s['optimizer']:,} | {e['params']:,} /"
                    f" {e['params'] + e['grads'] + e['optimizer']:,} | {r['in_use']:,} |"
                    f" {r['ratio']:.2f}x |",
                    flush=True,
                )


def rss_table(args) -> None:
    print(f"\n## Peak memory of {args.rss_steps} training steps (batch 8 x 64 tokens)\n")
    print("| model | rank | method | peak | vs PEFT LoRA | growth in training | time |")
    print("|---|---|---|---|---|---|---|")
    for model_name in args.models:
        for rank in args.ranks:
            baseline = None
            for method in args.methods:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", model_name, method, str(rank),
                     "--rss-steps", str(args.rss_steps), "--device", args.device],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                got = json.loads(out.stdout.strip().splitlines()[-1])
                baseline = baseline or got["peak_bytes"]
                grown = (got["peak_bytes"] - got["before_bytes"]) / 2**20
                print(
                    f"| {model_name} | {rank} | {method} | {got['peak_bytes'] / 2**20:,.0f} MiB"
                    f" | {got['peak_bytes'] / baseline:.3f}x | {grown:+,.0f} MiB |"
                    f" {got['seconds']:.1f} s |",
                    flush=True,
                )


def meta_print(args) -> None:
    print("\n## Llama-3-8B shapes (meta device): static training memory\n")
    print(
        "| rank | method | adapter params | training memory (bf16 base + fp32 adapter x4)"
        " | vs PEFT LoRA |"
    )
    print("|---|---|---|---|---|")
    for row in meta_table(args.ranks):
        base = 2 * row["base"]
        lora_bytes = base + 16 * row["peft-lora"]
        print(f"| {row['rank']} | peft-lora | {row['peft-lora']:,} | {gb(lora_bytes)} | 1.000x |")
        for storage in ("static", "dynamic"):
            for when in ("injected", "budget"):
                n = row[f"increlora-{storage}"][when]
                label = "after injection" if when == "injected" else "budget reached"
                print(
                    f"| {row['rank']} | increlora-{storage}, {label} | {n:,} |"
                    f" {gb(base + 16 * n)} | {(base + 16 * n) / lora_bytes:.3f}x |"
                )


if __name__ == "__main__":
    main()
