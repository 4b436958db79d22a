"""IncreLoRATrainer: growth to the budget, logging, exact resume, PEFT export (tiny BERT, CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora import IncreLoRAConfig

transformers = pytest.importorskip("transformers")
from increlora.training import IncreLoRATrainer  # noqa: E402
from increlora.training.hf import CONTROLLER_STATE  # noqa: E402

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
    out: Path, resume: bool | str | None = None, stop_at: int | None = None
) -> IncreLoRATrainer:
    case = MODEL_CASES["bert"]
    model = case.make()
    config = IncreLoRAConfig(
        target_modules=case.targets, modules_to_save=["classifier"], target_rank=2,
        init_warmup=2, interval=2, top_h=3, alpha=4,
    )  # fmt: skip
    adapted = increlora.inject(model, config)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=0.02, lr_scheduler_type="linear",
        save_strategy="steps", save_steps=3, logging_steps=100, report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = IncreLoRATrainer(
        model=model,
        adapted=adapted,
        args=args,
        train_dataset=_dataset(),
        callbacks=[_StopAt(stop_at)] if stop_at else None,
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
