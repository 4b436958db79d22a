"""The package's AdaLoRA as a PEFT method, masked by IncreLoRACallback in a plain Trainer.

References independent of the PEFT route: the same AdaLoRA put on the same model with
``increlora.inject`` and trained by ``IncreLoRATrainer`` (same seed: every mask and weight
must match), the trained model's own logits for ``from_pretrained`` and ``merge_and_unload``,
an uninterrupted run for resume, and PEFT alone (no increlora imported) for the exported LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import MODEL_CASES

import increlora
from increlora import ConfigError
from increlora.methods.adalora import AdaLoRAConfig

peft = pytest.importorskip("peft")
from test_callback import _arguments, _dataset, _StopAt  # noqa: E402
from test_peft_method import assert_peft_alone_matches  # noqa: E402

from increlora.integrations import (  # noqa: E402
    IncreloraAdaLoraConfig,
    IncreLoRACallback,
    export_lora,
)
from increlora.integrations.peft_adalora import IncreloraAdaLoraLayer  # noqa: E402
from increlora.integrations.peft_method import IncreLoraLayer, find_tuner  # noqa: E402
from increlora.training.hf import IncreLoRATrainer  # noqa: E402

# 12 modules x 4 triplets = 48, masked down to 24 over steps 3..8 (t_init 2, t_final 4).
FIELDS = dict(target_rank=2, init_rank=4, t_init=2, t_final=4, orth_reg_weight=0.5)
STEPS = 12
STOP_AT = 5  # mid-masking: budget 31 of 48


def _config(**overrides: Any) -> Any:
    fields = dict(
        target_modules=MODEL_CASES["bert"].targets, lora_alpha=4, task_type="SEQ_CLS", **FIELDS
    )
    return IncreloraAdaLoraConfig(**{**fields, **overrides})


def _args(out: Path, **overrides: Any) -> transformers.TrainingArguments:
    # No clipping: the callback adds the regularizer's gradient after clipping,
    # IncreLoRATrainer adds it to the loss (before): without clipping both are the same sum.
    fixed = dict(gradient_accumulation_steps=1, max_grad_norm=0.0, save_steps=STOP_AT)
    return _arguments(out, **{**fixed, **overrides})


def _train(out: Path, resume: Any = None, stop_at: int | None = None):
    model = peft.get_peft_model(MODEL_CASES["bert"].make(), _config())
    callback = IncreLoRACallback()
    trainer = transformers.Trainer(
        model=model,
        args=_args(out),
        train_dataset=_dataset(),
        callbacks=[callback] + ([_StopAt(stop_at)] if stop_at else []),
    )
    trainer.train(resume_from_checkpoint=resume)
    return model.eval(), callback


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("adalora")
    model, callback = _train(out)
    model.save_pretrained(out / "adapter")
    return model, callback, out


def test_get_peft_model_builds_the_package_adalora_layers(trained):
    model, _, out = trained
    assert isinstance(model, peft.PeftModelForSequenceClassification)
    layers = [m for m in model.modules() if isinstance(m, IncreloraAdaLoraLayer)]
    assert len(layers) == 12 and not any(isinstance(m, IncreLoraLayer) for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "classifier" in n for n in trainable)
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "INCRELORA_ADALORA" and saved["init_rank"] == 4
    # PEFT's own AdaLoRA is untouched by the registration
    assert peft.PeftType.ADALORA.value == "ADALORA"
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["ADALORA"] is peft.AdaLoraConfig


def test_callback_masks_exactly_like_the_package_own_adalora(trained, tmp_path):
    model, callback, _ = trained
    reference_model = MODEL_CASES["bert"].make()
    adapted = increlora.inject(
        reference_model,
        AdaLoRAConfig(
            target_modules=MODEL_CASES["bert"].targets, modules_to_save=["classifier"], alpha=4,
            **FIELDS,
        ),
    )  # fmt: skip
    reference = IncreLoRATrainer(
        model=reference_model, adapted=adapted, args=_args(tmp_path, save_strategy="no"),
        train_dataset=_dataset(), export_dir=None,
    )  # fmt: skip
    reference.train()
    history = callback.controller.history
    assert [e["step"] for e in history] == [3, 4, 5, 6, 7, 8]
    assert history[-1]["kept"] == 24 and sum(find_tuner(model).rank_pattern().values()) == 24
    assert [e["rank_pattern"] for e in history] == [
        e["rank_pattern"] for e in reference.controller.history
    ]
    ours = find_tuner(model).adapted.layers
    for name, layer in adapted.layers.items():
        assert torch.equal(ours[name].kept, layer.kept), name
        for key in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(
                getattr(ours[name], key), getattr(layer, key), rtol=0, atol=0, msg=name
            )
    logged = [h for h in callback.trainer.state.log_history if "increlora/kept" in h]
    assert [h["step"] for h in logged] == [3, 4, 5, 6, 7, 8] and logged[-1]["increlora/kept"] == 24


def test_from_pretrained_round_trips_masks_state_and_logits(trained):
    model, callback, out = trained
    reloaded = peft.PeftModel.from_pretrained(MODEL_CASES["bert"].make(), out / "adapter").eval()
    tuner, original = find_tuner(reloaded), find_tuner(model)
    inputs = MODEL_CASES["bert"].inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=0)
    for name, layer in original.adapted.layers.items():
        assert torch.equal(tuner.adapted.layers[name].kept, layer.kept), name
    state, saved = tuner.pending_controller_state, callback.controller.state_dict()
    assert state["history"] == saved["history"] and state["guard"] == saved["guard"]
    for got, want in zip(state["importance"]["sensitivity"], saved["importance"]["sensitivity"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())  # inference mode
    with torch.no_grad():
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_exported_lora_loads_with_peft_alone(trained, tmp_path):
    model, _, _ = trained
    config = export_lora(model, tmp_path / "lora")
    assert config["peft_type"] == "LORA"
    ranks = find_tuner(model).rank_pattern()
    assert sum(config["rank_pattern"].get(k, config["r"]) for k in config["target_modules"]) == (
        sum(ranks.values())
    )
    assert_peft_alone_matches(model, tmp_path / "lora", tmp_path)


def test_resume_from_a_mid_masking_checkpoint_is_exact(trained, tmp_path):
    model, callback, _ = trained
    _, stopped = _train(tmp_path, stop_at=STOP_AT)
    assert [e["step"] for e in stopped.controller.history] == [3, 4, 5]
    resumed_model, resumed = _train(tmp_path, resume=True)
    assert resumed.controller.history == callback.controller.history
    expected = dict(model.named_parameters())
    for name, p in resumed_model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=0, msg=name)


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError) as err:
        IncreloraAdaLoraConfig(target_r=2, tinit=1)  # PEFT AdaLoraConfig's spellings
    message = str(err.value)
    assert "\n" not in message and message.startswith("IncreloraAdaLoraConfig: unknown field")
    assert "'target_r' -> 'target_rank'" in message and "'tinit' -> 't_init'" in message
    with pytest.raises(ConfigError, match=r"^IncreloraAdaLoraConfig: init_rank: must be >= "):
        IncreloraAdaLoraConfig(target_rank=4, init_rank=2)


def test_impossible_target_fails_in_one_line_before_the_model_is_touched():
    base = MODEL_CASES["bert"].make()
    before = {n: p.clone() for n, p in base.state_dict().items()}
    with pytest.raises(ConfigError) as err:  # 18 triplets in 16 x 16 projections
        peft.get_peft_model(base, _config(target_rank=12, init_rank=None))
    assert "\n" not in str(err.value) and "init_rank: 18 triplets exceed" in str(err.value)
    assert not any("lora_" in n for n in base.state_dict())
    assert all(torch.equal(p, before[n]) for n, p in base.state_dict().items())
