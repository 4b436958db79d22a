"""Check a real causal-LM run's adapter outside increlora: plain PEFT and a merged export.

    python benchmarks/lm_export_check.py runs/smollm2_qasc

The run's ``samples.jsonl`` holds, per eval split, the first examples' prompts (as the model
saw them) and the tokens its own evaluation generated. This script regenerates them, greedily
and with the prompts left-padded as the run did, from

1. the base model loaded with transformers plus ``PeftModel.from_pretrained(base, adapter/)``,
2. ``increlora export --adapter adapter/ --output <tmp>`` loaded with
   ``AutoModelForCausalLM.from_pretrained`` (no peft, no increlora),

and prints how many of them match token for token (tests check the same on a tiny Llama;
this is the real-model version, too slow for the test suite). Exit code 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def _batches(samples: list[dict], tokenizer) -> dict[str, tuple[torch.Tensor, torch.Tensor, list]]:
    """Per split: the left-padded prompt ids and mask, and the samples in that order."""
    from increlora.runner.generation import CausalCollator

    by_split: dict[str, list[dict]] = {}
    for sample in samples:
        by_split.setdefault(sample["split"], []).append(sample)
    out = {}
    for split, items in by_split.items():
        prompts = [tokenizer(s["prompt"], add_special_tokens=False)["input_ids"] for s in items]
        batch = CausalCollator(tokenizer.pad_token_id, generation=True)(
            [
                {"input_ids": p, "labels": [-100] * len(p), "prompt": p, "index": s["index"]}
                for p, s in zip(prompts, items)
            ]
        )
        out[split] = (batch["prompt_input_ids"], batch["prompt_attention_mask"], items)
    return out


def _compare(name: str, model, tokenizer, batches, max_new_tokens: int) -> int:
    from increlora.runner.generation import greedy_generate

    mismatches = 0
    start = time.time()
    for split, (ids, mask, items) in batches.items():
        with torch.no_grad():
            tokens = greedy_generate(
                model, ids, mask, max_new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id
            )
        for sample, row in zip(items, tokens.tolist()):
            got = [t for t in row if t != tokenizer.pad_token_id]
            if got != sample["generated_ids"]:
                mismatches += 1
                print(
                    f"  {name} {split}[{sample['index']}]: run {sample['generation']!r},"
                    f" here {tokenizer.decode(got, skip_special_tokens=True)!r}",
                    file=sys.stderr,
                )
    total = sum(len(b[2]) for b in batches.values())
    print(
        f"{name}: {total - mismatches}/{total} generations identical ({time.time() - start:.0f}s)"
    )
    return mismatches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished causal-LM run directory")
    args = parser.parse_args(argv)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from increlora import cli
    from increlora.assets import resolve_model
    from increlora.tasks import get_task

    metrics = json.loads((args.run / "metrics.json").read_text())
    samples = [json.loads(x) for x in (args.run / "samples.jsonl").read_text().splitlines()]
    config = metrics["config"]
    max_new = (
        config["data"].get("max_new_tokens") or get_task(config["data"]["task"]).max_new_tokens
    )
    resolved = resolve_model(config["model"])
    kwargs = resolved.pretrained_kwargs()
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kwargs)
    batches = _batches(samples, tokenizer)

    base = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs).eval()
    peft_model = PeftModel.from_pretrained(base, args.run / "adapter").eval()
    failed = _compare("PEFT reload", peft_model, tokenizer, batches, max_new)
    del peft_model, base

    with tempfile.TemporaryDirectory() as tmp:
        merged_dir = Path(tmp) / "merged"
        code = cli.main(
            ["export", "--adapter", str(args.run / "adapter"), "--output", str(merged_dir)]
        )
        if code != 0:
            print(f"increlora export failed with exit code {code}", file=sys.stderr)
            return 1
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        failed += _compare("merged export", merged, merged_tokenizer, batches, max_new)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
