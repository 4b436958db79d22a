"""IncreLoRATrainer: growth to the budget, logging, exact resume, PEFT export (tiny BERT, CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers  # a dependency of increlora: never skipped
from conftest import MODEL_CASES

import increlora
from increlora import IncreLoRAConfig
from increlora.io import load_state
from increlora.training import IncreLoRATrainer
from increlora.training.hf import CONTROLLER_STATE

STEPS = 12  # rounds at 4, 6, 8, 10: 12 modules grow from rank 1 to average 2 (3 per round)
STOP_AT = 6  # the run that is "killed" stops right after its checkpoint at step 6


def _dataset() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (48, 9), generator=g)
    return [{"input_ids": x, "labels": int(x.sum() % 2)} for x in ids]


class _StopAt(transformers.TrainerCallback):
    """Simulates a killed job: training ends right after the checkpoint of ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _train(
    out: Path,
    resume: bool | str | None = None,
    stop_at: int | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    **arguments: Any,
) -> IncreLoRATrainer:
    case = MODEL_CASES["bert"]
    model = case.make()
    config = IncreLoRAConfig(
        target_modules=case.targets, modules_to_save=["classifier"], target_rank=2,
        init_warmup=2, interval=2, top_h=3, alpha=4,
    )  # fmt: skip
    adapted = increlora.inject(model, config)
    defaults = dict(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=0.02, lr_scheduler_type="linear",
        save_strategy="steps", save_steps=3, logging_steps=2, report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    args = transformers.TrainingArguments(**{**defaults, **arguments})
    trainer = IncreLoRATrainer(
        model=model,
        adapted=adapted,
        args=args,
        train_dataset=_dataset(),
        callbacks=[_StopAt(stop_at)] if stop_at else None,
        **(trainer_kwargs or {}),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> IncreLoRATrainer:
    return _train(tmp_path_factory.mktemp("straight"))


def test_trainer_grows_to_the_budget_and_logs_decisions(straight):
    controller = straight.controller
    assert controller.total_rank == 24 and not controller.growing
    assert [e["step"] for e in controller.history] == [4, 6, 8, 10]
    logged = [h for h in straight.state.log_history if "increlora/total_rank" in h]
    assert [h["step"] for h in logged] == [4, 6, 8, 10]
    assert [h["increlora/total_rank"] for h in logged] == [15, 18, 21, 24]
    first = controller.history[0]["grown"]
    assert all(logged[0][f"increlora/rank/{g['module']}"] == g["rank"] for g in first)
    checkpoint = Path(straight.args.output_dir) / "checkpoint-6"
    assert (checkpoint / f"{CONTROLLER_STATE}.json").is_file()


def test_trainer_exports_a_peft_adapter(straight):
    peft = pytest.importorskip("peft")
    model = straight.adapted.model.eval()
    reloaded = peft.PeftModel.from_pretrained(
        MODEL_CASES["bert"].make(), Path(straight.args.output_dir) / "peft_adapter"
    ).eval()
    inputs = MODEL_CASES["bert"].inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5
        )


def test_resume_from_checkpoint_continues_growth_exactly(straight, tmp_path):
    stopped = _train(tmp_path, stop_at=STOP_AT)
    assert stopped.state.global_step == STOP_AT and stopped.controller.growing
    resumed = _train(tmp_path, resume=True)
    assert resumed.state.global_step == STEPS
    assert resumed.adapted.rank_pattern() == straight.adapted.rank_pattern()
    assert [e["grown"] for e in resumed.controller.history] == [
        e["grown"] for e in straight.controller.history
    ]
    expected = dict(straight.adapted.named_trainable_parameters())
    for name, p in resumed.adapted.named_trainable_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=0, msg=name)


def test_resume_from_a_foreign_checkpoint_is_a_clear_error(straight, tmp_path):
    checkpoint = shutil.copytree(Path(straight.args.output_dir) / "checkpoint-3", tmp_path / "ck")
    (checkpoint / f"{CONTROLLER_STATE}.json").unlink()
    with pytest.raises(increlora.AdapterFileError, match="not written by IncreLoRATrainer"):
        _train(tmp_path / "out", resume=str(checkpoint))


def test_growth_rounds_keep_the_trainers_loss_log(straight):
    # Rounds at 4, 6, 8, 10 are logging steps too (logging_steps=2): each keeps its loss.
    log = straight.state.log_history
    assert [h["step"] for h in log if "loss" in h] == list(range(2, STEPS + 1, 2))


def test_budget_reached_and_the_real_trainable_count_are_logged(straight):
    controller = straight.controller
    log = straight.state.log_history
    assert [h["step"] for h in log if "increlora/budget_reached" in h] == [10]
    last = [h for h in log if "increlora/trainable_params" in h][-1]
    assert last["step"] == 10
    assert last["increlora/trainable_params"] == controller.num_trainable_parameters()
    # The last round's event counts what trains after the same step's reserve drop.
    assert controller.history[-1]["trainable_params"] == controller.num_trainable_parameters()
    assert controller.history[-1]["budget_reached"]


def test_save_model_reloads_with_from_pretrained(straight, tmp_path):
    before = {k: v.clone() for k, v in straight.model.state_dict().items()}
    straight.save_model(str(tmp_path / "saved"))
    for key, value in straight.model.state_dict().items():  # saving changed nothing
        assert torch.equal(value, before[key]), key
    reloaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "saved", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    inputs = MODEL_CASES["bert"].inputs()
    model = straight.adapted.model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, expected, rtol=0, atol=1e-5)
    peft = pytest.importorskip("peft")
    adapter = peft.PeftModel.from_pretrained(
        MODEL_CASES["bert"].make(), tmp_path / "saved" / "peft_adapter"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_load_best_model_at_end_restores_the_ranks_of_the_best_checkpoint(tmp_path):
    evaluations: list[int] = []

    def earliest_is_best(prediction):  # best at the first evaluation (step 3, before growth)
        evaluations.append(1)
        return {"score": -float(len(evaluations))}

    trainer = _train(
        tmp_path,
        trainer_kwargs=dict(eval_dataset=_dataset()[:8], compute_metrics=earliest_is_best),
        eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
        metric_for_best_model="score", greater_is_better=True,
    )  # fmt: skip
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-3")
    best = load_state(tmp_path / "checkpoint-3", CONTROLLER_STATE)
    assert trainer.controller.state_dict()["ranks"] == best["ranks"]
    assert trainer.controller.total_rank == 12  # the initial rank 1 of the 12 modules
    assert set(trainer.adapted.rank_pattern().values()) == {1}
    peft = pytest.importorskip("peft")
    exported = peft.PeftModel.from_pretrained(
        MODEL_CASES["bert"].make(), tmp_path / "peft_adapter"
    ).eval()
    inputs = MODEL_CASES["bert"].inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            exported(**inputs).logits,
            trainer.adapted.model.eval()(**inputs).logits,
            rtol=0,
            atol=1e-5,
        )


class _FirstStepGradients(transformers.TrainerCallback):
    """Keeps the accumulated gradients of the first optimizer step, then stops."""

    def __init__(self, adapted) -> None:
        self.adapted = adapted
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.grads = {n: p.grad.clone() for n, p in self.adapted.named_trainable_parameters()}

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def _first_step_gradients(case_name: str, out: Path, batch: int, accumulation: int):
    case = MODEL_CASES[case_name]
    model = case.make()
    for module in model.modules():  # no dropout: both splits of the batch see the same model
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = IncreLoRAConfig(
        target_modules=case.targets, modules_to_save=case.modules_to_save, target_rank=2,
        init_warmup=2, interval=2, top_h=3, alpha=4, orth_reg_weight=0.5,
        init="paper",  # B != 0 at the start, so the regularizer has a gradient from step 1
    )  # fmt: skip
    adapted = increlora.inject(model, config)
    ids = torch.randint(0, 64, (8, 9), generator=torch.Generator().manual_seed(0))
    if case_name == "bert":
        data = [{"input_ids": x, "labels": int(x.sum() % 2)} for x in ids]
    else:
        data = [{"input_ids": x, "labels": x.clone()} for x in ids]
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=0.02, max_grad_norm=0.0,
        save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    grads = _FirstStepGradients(adapted)
    trainer = IncreLoRATrainer(
        model=model, adapted=adapted, args=args, train_dataset=data, callbacks=[grads]
    )
    trainer.train()
    return grads.grads


@pytest.mark.parametrize("case_name", ["bert", "llama"])
def test_gradient_accumulation_keeps_the_regularizer_weight(case_name, tmp_path):
    """One batch of 8 vs two accumulated micro-batches of 4: the same relative weights.

    At the first step every e is 0: the task loss has no gradient on A and B, the
    orthogonality regularizer none on e. Whatever factor the Trainer applies to the task
    loss under accumulation (x2 for BERT's classification loss, which ignores
    num_items_in_batch; x1 for Llama's token-normalized loss), the regularizer gets it too.
    """
    whole = _first_step_gradients(case_name, tmp_path / "a", batch=8, accumulation=1)
    split = _first_step_gradients(case_name, tmp_path / "b", batch=4, accumulation=2)
    task = [n for n in whole if n.endswith("lora_E")]
    regularizer = [n for n in whole if n.endswith(("lora_A", "lora_B"))]
    assert task and regularizer
    numerator = sum(float((split[n] * whole[n]).sum()) for n in task)
    factor = numerator / sum(float(whole[n].pow(2).sum()) for n in task)
    assert factor == pytest.approx(2.0 if case_name == "bert" else 1.0, rel=1e-4)
    for name in task + regularizer:
        torch.testing.assert_close(split[name], factor * whole[name], rtol=1e-4, atol=1e-7)
