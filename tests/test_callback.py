"""IncreLoRACallback in trainers it does not own: plain Trainer and TRL's SFTTrainer.

A PEFT model (get_peft_model with IncreLoraConfig) trains with ``callbacks=[IncreLoRACallback()]``
and nothing else of this package. References: an uninterrupted run for resume; plain PyTorch
autograd of the task loss and of the orthogonal regularizer written out here for the gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import MODEL_CASES

import increlora  # noqa: F401  (registers the PEFT method)

peft = pytest.importorskip("peft")
from increlora.integrations import IncreLoRACallback, IncreLoraConfig  # noqa: E402
from increlora.integrations.peft_method import find_tuner  # noqa: E402
from increlora.training.hf import CONTROLLER_STATE  # noqa: E402

STEPS = 12  # rounds at 4, 6, 8, 10: 12 modules grow from rank 1 to average 2 (3 per round)
STOP_AT = 6


def _config(**overrides: Any) -> Any:
    fields = dict(
        target_modules=MODEL_CASES["bert"].targets, target_rank=2, init_warmup=2, interval=2,
        top_h=3, lora_alpha=4, task_type="SEQ_CLS",
    )  # fmt: skip
    return IncreLoraConfig(**{**fields, **overrides})


def _dataset(n: int = 48) -> list[dict[str, Any]]:
    ids = torch.randint(0, 64, (n, 9), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": x, "labels": int(x.sum() % 2)} for x in ids]


class _StopAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _arguments(out: Path, **overrides: Any) -> transformers.TrainingArguments:
    defaults = dict(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=0.02, lr_scheduler_type="linear",
        save_strategy="steps", save_steps=3, logging_steps=2, report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    return transformers.TrainingArguments(**{**defaults, **overrides})


def _train(out: Path, resume: Any = None, stop_at: int | None = None, **arguments: Any):
    model = peft.get_peft_model(MODEL_CASES["bert"].make(), _config())
    callback = IncreLoRACallback()
    trainer = transformers.Trainer(
        model=model,
        args=_arguments(out, **arguments),
        train_dataset=_dataset(),
        callbacks=[callback] + ([_StopAt(stop_at)] if stop_at else []),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory):
    return _train(tmp_path_factory.mktemp("straight"))


def test_plain_trainer_grows_to_the_budget_and_logs_decisions(straight):
    trainer, callback = straight
    controller = callback.controller
    assert controller.total_rank == 24 and not controller.growing
    assert [e["step"] for e in controller.history] == [4, 6, 8, 10]
    logged = [h for h in trainer.state.log_history if "increlora/total_rank" in h]
    assert [h["step"] for h in logged] == [4, 6, 8, 10]
    assert [h["increlora/total_rank"] for h in logged] == [15, 18, 21, 24]
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == list(range(2, 13, 2))
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-6"
    assert (checkpoint / f"{CONTROLLER_STATE}.json").is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()  # PEFT's own checkpoint


def test_resume_from_a_mid_growth_checkpoint_is_exact(straight, tmp_path):
    trainer, callback = straight
    _, stopped = _train(tmp_path, stop_at=STOP_AT)
    assert stopped.controller.growing and stopped.controller.total_rank == 18
    resumed_trainer, resumed = _train(tmp_path, resume=True)
    assert resumed_trainer.state.global_step == STEPS
    assert [e["grown"] for e in resumed.controller.history] == [
        e["grown"] for e in callback.controller.history
    ]
    expected = dict(trainer.model.named_parameters())
    for name, p in resumed_trainer.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=0, msg=name)


def _decisions(callback: IncreLoRACallback) -> list[list[tuple[str, int]]]:
    """Per round: the modules that grew and their new rank (in name order, not score order)."""
    history = callback.controller.history
    return [sorted((g["module"], g["rank"]) for g in e["grown"]) for e in history]


def test_bf16_autocast_grows_like_fp32(straight, tmp_path):
    """The Trainer's bf16 autocast: the adapted layers run in bf16, and growth picks the same
    modules at the same steps as in fp32. Not fp16: on CPU the Trainer accepts fp16=True but
    runs fp32 (this test with fp16 saw fp32 layer outputs and no grad scaler); it needs a GPU."""
    dtypes: set[torch.dtype] = set()

    class _Dtypes(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layer = next(iter(find_tuner(model).adapted.layers.values()))
            layer.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))

    model = peft.get_peft_model(MODEL_CASES["bert"].make(), _config())
    callback = IncreLoRACallback()
    trainer = transformers.Trainer(
        model=model, args=_arguments(tmp_path, bf16=True, save_strategy="no"),
        train_dataset=_dataset(), callbacks=[callback, _Dtypes()],
    )  # fmt: skip
    trainer.train()
    assert dtypes == {torch.bfloat16}
    assert callback.controller.total_rank == 24
    _, fp32 = straight
    assert _decisions(callback) == _decisions(fp32)
    # not the fp32 run again: the scores moved (by up to ~20% on this tiny model)
    scores = [e["scores"] for e in callback.controller.history]
    assert scores != [e["scores"] for e in fp32.controller.history]


def test_load_best_model_at_end_restores_the_best_ranks(tmp_path):
    evaluations: list[int] = []

    def earliest_is_best(prediction):  # best at the first evaluation (step 3, before growth)
        evaluations.append(1)
        return {"score": -float(len(evaluations))}

    model = peft.get_peft_model(MODEL_CASES["bert"].make(), _config())
    callback = IncreLoRACallback()
    args = _arguments(
        tmp_path, eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
        metric_for_best_model="score", greater_is_better=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(8),
        compute_metrics=earliest_is_best, callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-3")
    assert callback.controller.total_rank == 12  # the initial rank 1 of the 12 modules
    assert set(find_tuner(model).rank_pattern().values()) == {1}


def _orthogonal_penalty(model: torch.nn.Module, gamma: float) -> torch.Tensor:
    """gamma * mean over modules of (||A A^T - I|| + ||B^T B - I||) / 2, used ranks (plain torch)."""
    terms = []
    for layer in find_tuner(model).adapted.layers.values():
        u = layer.used_rank
        a, b = layer.lora_A[:u], layer.lora_B[:, :u]
        eye = torch.eye(u)
        terms.append(((a @ a.T - eye) ** 2).sum().sqrt() + ((b.T @ b - eye) ** 2).sum().sqrt())
    return gamma * torch.stack(terms).mean() / 2


class _Gradients(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.grads = {
                n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
            }
            control.should_training_stop = True


def test_regularizer_gradient_is_added_once_per_step(tmp_path):
    data = _dataset(8)
    model = peft.get_peft_model(MODEL_CASES["bert"].make(), _config(orth_reg_weight=0.5))
    reference = peft.get_peft_model(MODEL_CASES["bert"].make(), _config(orth_reg_weight=0.5))
    reference.load_state_dict(model.state_dict())
    grads = _Gradients()
    args = _arguments(
        tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=1, max_grad_norm=0.0,
        save_strategy="no",
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[IncreLoRACallback(), grads]
    )
    for module in model.modules():  # same function in both: no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer.train()
    ids = torch.stack([d["input_ids"] for d in data])
    labels = torch.tensor([d["labels"] for d in data])
    reference.train()
    for module in reference.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    loss = reference(input_ids=ids, labels=labels).loss + _orthogonal_penalty(reference, 0.5)
    loss.backward()
    adapter = [n for n in grads.grads if ".lora_" in n]
    assert adapter
    for name, p in reference.named_parameters():
        if name in adapter:
            torch.testing.assert_close(grads.grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_callback_without_an_increlora_model_is_a_clear_error(tmp_path):
    trainer = transformers.Trainer(
        model=MODEL_CASES["bert"].make(),
        args=_arguments(tmp_path, max_steps=1, save_strategy="no"),
        train_dataset=_dataset(8),
        callbacks=[IncreLoRACallback()],
    )
    with pytest.raises(ValueError, match="holds no IncreLoRA adapter"):
        trainer.train()


# ----------------------------------------------------------------------------- TRL
def _tiny_tokenizer() -> Any:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(60)} | {"<pad>": 60, "<eos>": 61, "<unk>": 62}
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def test_sft_trainer_grows_with_completion_only_loss(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "prompt": " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (5,), generator=g)),
            "completion": " "
            + " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (2,), generator=g)),
        }
        for _ in range(32)
    ]
    base = MODEL_CASES["llama"].make()
    base.config.pad_token_id = 60
    config = IncreLoraConfig(
        target_modules=MODEL_CASES["llama"].targets, target_rank=2, init_warmup=2, interval=2,
        top_h=3, lora_alpha=4, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = peft.get_peft_model(base, config)
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4,
        learning_rate=0.02, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, logging_steps=5, completion_only_loss=True, max_length=16,
        dataloader_num_workers=0,
    )  # fmt: skip
    callback = IncreLoRACallback()
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=_tiny_tokenizer(),
        callbacks=[callback],
    )
    trainer.train()
    assert callback.controller.total_rank == 2 * len(find_tuner(model).adapted.layers)
    assert [e["step"] for e in callback.controller.history] == [4, 6, 8]
    labels = trainer.train_dataset[0]["labels"]  # completion-only: prompt tokens not scored
    assert labels[:5] == [-100] * 5 and -100 not in labels[5:]
    assert any("increlora/total_rank" in h for h in trainer.state.log_history)
