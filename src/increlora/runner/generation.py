"""Causal-LM data and evaluation: response-only loss, length-grouped batches, greedy decoding.

How an example becomes tokens (:func:`encode`):

- The prompt: with a tokenizer that has a chat template, ``apply_chat_template(messages,
  add_generation_prompt=True)`` of the turns before the response; without one, the plain
  format ``prompt + "\\n"`` (the turns' contents joined by newlines), tokenized with the
  tokenizer's special tokens (a BOS where it adds one).
- The response: its tokens, then the EOS token (``tokenizer.eos_token_id``).
- ``labels`` are -100 on every prompt token (and on padding): the loss is over the response
  and its EOS only.
- Longer than ``max_length``: the response keeps up to the larger of what the prompt leaves
  and half of ``max_length`` (cut at its end, losing the EOS), the prompt keeps its last
  tokens (the question and the chat template's assistant header). Counted in ``stats``.

Training batches are padded on the right to their longest example, drawn by a
length-grouped sampler (a seeded permutation, sorted by length inside chunks of 50
batches) so little compute goes to padding. Evaluation: the mean response-token loss
(and its exp, perplexity) on the same encoding, and greedy decoding of the prompts padded
on the LEFT, up to ``max_new_tokens`` or EOS, scored by SQuAD exact match and token F1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..io import atomic_write_text
from ..tasks.causal_lm import CausalTaskSpec, PromptResponse
from ..tasks.generation_metrics import best_over_references, generation_scores
from .data import EpochSampler, seeded_loader

IGNORE_INDEX = -100
SAMPLES = "samples.jsonl"
"""A few generations of the exported adapter's evaluation, in the run directory."""
NUM_SAMPLES = 8
"""Examples per eval split written to ``samples.jsonl`` (the first ones of each split)."""
GROUP_BATCHES = 50
"""Batches per chunk of the length-grouped sampler."""


def uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, example: PromptResponse) -> list[int]:
    """The prompt's tokens: the chat template's, or the plain ``prompt + "\\n"``."""
    if uses_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [dict(m) for m in example.messages], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(example.prompt + "\n", add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and tokenizer.bos_token_id != eos:
        ids = ids[:-1]  # a tokenizer that ends every text with EOS: the response follows
    return ids


@dataclass
class Encoded:
    prompt: list[int]
    response: list[int]  # ends with EOS unless truncated
    truncated: bool


def encode(tokenizer: Any, example: PromptResponse, max_length: int) -> Encoded:
    """Prompt and response tokens (EOS appended), truncated to ``max_length`` together."""
    prompt = prompt_ids(tokenizer, example)
    response = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    response.append(tokenizer.eos_token_id)
    if len(prompt) + len(response) <= max_length:
        return Encoded(prompt, response, False)
    keep_response = min(len(response), max(max_length - len(prompt), max_length // 2))
    keep_prompt = max_length - keep_response
    return Encoded(prompt[len(prompt) - keep_prompt :], response[:keep_response], True)


class CausalLMDataset(Dataset):
    """Examples encoded once up front: ``input_ids`` and ``labels`` (prompt masked)."""

    def __init__(self, examples: Sequence[PromptResponse], tokenizer: Any, max_length: int) -> None:
        self.examples = list(examples)
        self.encoded = [encode(tokenizer, ex, max_length) for ex in self.examples]
        self.stats = {
            "examples": len(self.encoded),
            "truncated": sum(e.truncated for e in self.encoded),
            "chat_template": uses_chat_template(tokenizer),
        }

    def __len__(self) -> int:
        return len(self.encoded)

    def lengths(self) -> list[int]:
        return [len(e.prompt) + len(e.response) for e in self.encoded]

    def __getitem__(self, index: int) -> dict[str, Any]:
        e = self.encoded[index]
        return {
            "input_ids": e.prompt + e.response,
            "labels": [IGNORE_INDEX] * len(e.prompt) + e.response,
            "prompt": e.prompt,
            "index": index,
        }


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [
        ([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows
    ]
    return torch.tensor(padded, dtype=torch.long)


class CausalCollator:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (padding labelled -100).

    ``generation=True`` (evaluation) adds the prompts padded on the left
    (``prompt_input_ids``/``prompt_attention_mask``) and each example's ``index``.
    """

    def __init__(self, pad_token_id: int, generation: bool = False) -> None:
        self.pad = pad_token_id
        self.generation = generation

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [item["input_ids"] for item in items]
        batch = {
            "input_ids": _pad(ids, self.pad),
            "attention_mask": _pad([[1] * len(r) for r in ids], 0),
            "labels": _pad([item["labels"] for item in items], IGNORE_INDEX),
        }
        if self.generation:
            prompts = [item["prompt"] for item in items]
            batch["prompt_input_ids"] = _pad(prompts, self.pad, left=True)
            batch["prompt_attention_mask"] = _pad([[1] * len(p) for p in prompts], 0, left=True)
            batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return batch


class LengthGroupedSampler(EpochSampler):
    """The epoch's seeded permutation, sorted by length (longest first) inside chunks.

    Chunks hold ``GROUP_BATCHES`` batches, so batches are of similar lengths (little
    padding) while the order stays random across chunks; it depends only on (seed, epoch),
    so ``--resume`` rebuilds it exactly.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        super().__init__(len(lengths), seed)
        self.lengths = list(lengths)
        self.chunk = batch_size * GROUP_BATCHES

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        grouped: list[int] = []
        for start in range(0, len(order), self.chunk):
            chunk = order[start : start + self.chunk]
            grouped += sorted(chunk, key=lambda i: -self.lengths[i])
        return iter(grouped)


def causal_train_loader(
    dataset: CausalLMDataset, pad_token_id: int, batch_size: int, seed: int
) -> tuple[DataLoader, LengthGroupedSampler]:
    """The training DataLoader (length-grouped, right-padded) and its sampler."""
    sampler = LengthGroupedSampler(dataset.lengths(), batch_size, seed)
    collate = CausalCollator(pad_token_id)
    return seeded_loader(dataset, batch_size, collate, sampler, seed), sampler


def causal_eval_loader(dataset: CausalLMDataset, pad_token_id: int, batch_size: int) -> DataLoader:
    return seeded_loader(dataset, batch_size, CausalCollator(pad_token_id, generation=True))


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int,
) -> torch.Tensor:
    """Greedy continuations of left-padded prompts: (batch, max_new_tokens), pad-filled.

    Plain ``model.generate`` (any transformers / PEFT model): no sampling, one beam,
    stopping at EOS. Tokens after an example's EOS are set to ``pad_token_id``.
    """
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    new = out[:, input_ids.shape[1] :]
    finished = torch.cumsum((new == eos_token_id).long(), dim=1)
    after_eos = (finished - (new == eos_token_id).long()) > 0
    new = new.masked_fill(after_eos, pad_token_id)
    full = torch.full((new.shape[0], max_new_tokens), pad_token_id, dtype=new.dtype)
    full[:, : new.shape[1]] = new.cpu()
    return full


def decode_generation(tokenizer: Any, tokens: Sequence[int]) -> str:
    """The text of generated tokens up to the first EOS (special tokens dropped)."""
    tokens = list(tokens)
    eos = tokenizer.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def generation_limit(model: torch.nn.Module, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit before ``max_new_tokens`` in the model's positions."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return None if positions is None else max(1, positions - max_new_tokens)


class GenerationEvaluator:
    """Evaluates a causal LM on eval splits: loss / perplexity and greedy exact match / F1."""

    def __init__(
        self,
        task: CausalTaskSpec,
        evals: dict[str, Sequence[PromptResponse]],
        tokenizer: Any,
        max_length: int,
        max_new_tokens: int,
        num_samples: int = NUM_SAMPLES,
    ) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.num_samples = num_samples
        self.datasets = {
            split: CausalLMDataset(examples, tokenizer, max_length)
            for split, examples in evals.items()
        }
        self.samples: list[dict[str, Any]] = []

    def loaders(self, batch_size: int) -> dict[str, DataLoader]:
        pad = self.tokenizer.pad_token_id
        return {
            split: causal_eval_loader(dataset, pad, batch_size)
            for split, dataset in self.datasets.items()
        }

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, loaders: dict[str, DataLoader], accelerator: Any, step: int
    ) -> dict[str, dict[str, float]]:
        """Metrics per split (every process's share gathered); keeps ``self.samples``."""
        was_training = model.training
        model.eval()
        unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=True)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        limit = generation_limit(unwrapped, self.max_new_tokens)
        results: dict[str, dict[str, float]] = {}
        samples: list[dict[str, Any]] = []
        for split, loader in loaders.items():
            dataset = self.datasets[split]
            loss_sum, token_count = 0.0, 0
            generated: dict[int, list[int]] = {}
            for batch in loader:
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                sums, counts = response_loss(logits, batch["labels"])
                prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
                if limit is not None and prompt_ids.shape[1] > limit:
                    prompt_ids, prompt_mask = prompt_ids[:, -limit:], prompt_mask[:, -limit:]
                tokens = greedy_generate(
                    unwrapped, prompt_ids, prompt_mask, self.max_new_tokens, pad, eos
                ).to(batch["index"].device)
                sums, counts, tokens, index = accelerator.gather_for_metrics(
                    (sums, counts, tokens, batch["index"])
                )
                loss_sum += float(sums.sum())
                token_count += int(counts.sum())
                for i, row in zip(index.tolist(), tokens.tolist()):
                    generated[i] = row
            order = sorted(generated)
            predictions = [decode_generation(self.tokenizer, generated[i]) for i in order]
            references = [dataset.examples[i].references for i in order]
            loss = loss_sum / max(1, token_count)
            results[split] = {
                **generation_scores(predictions, references),
                "loss": loss,
                "perplexity": math.exp(min(loss, 700.0)),
            }
            for i, prediction in list(zip(order, predictions))[: self.num_samples]:
                example = dataset.examples[i]
                em, f1 = best_over_references(prediction, example.references)
                samples.append(
                    {
                        "step": step,
                        "split": split,
                        "index": i,
                        "prompt": self.tokenizer.decode(dataset.encoded[i].prompt),
                        "references": list(example.references),
                        "generation": prediction,
                        "generated_ids": [t for t in generated[i] if t != pad],
                        "exact_match": em,
                        "f1": f1,
                    }
                )
        self.samples = samples
        model.train(was_training)
        return results


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed next-token loss over labelled tokens, and their count."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    mask = targets != IGNORE_INDEX
    return (losses * mask).sum(dim=1), mask.sum(dim=1)


def write_samples(path: Path, samples: list[dict[str, Any]]) -> None:
    """``samples.jsonl``: one JSON object per generation, written atomically."""
    import json

    text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    atomic_write_text(path, text)
