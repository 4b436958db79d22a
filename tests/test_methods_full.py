"""Full fine-tuning: every weight trains, the handle acts like an adapter handle."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora.config import ConfigError
from increlora.io import AdapterFileError, load_tensors
from increlora.methods.full import FullConfig

GPT2 = MODEL_CASES["gpt2"]  # tied input / output embeddings


def test_every_parameter_trains_and_tied_weights_count_once():
    model = GPT2.make()
    adapted = increlora.inject(model, FullConfig())
    unique = {id(p): p.numel() for p in model.parameters()}
    assert adapted.num_trainable_parameters() == sum(unique.values())
    assert len(adapted.trainable_parameters()) == len(unique)
    assert adapted.rank_pattern() == {} and adapted.layers == {}


def test_adapter_only_operations_say_why_they_do_not_apply(tmp_path):
    model = GPT2.make()
    adapted = increlora.inject(model, FullConfig())
    with pytest.raises(RuntimeError, match="no separate adapter"), adapted.disabled():
        pass
    with pytest.raises(NotImplementedError):
        adapted.export_peft(tmp_path / "peft")
    adapted.merge()
    adapted.unmerge()
    assert adapted.merge_and_unload() is model


def test_save_load_round_trip_with_tied_weights(tmp_path):
    model = GPT2.make()
    adapted = increlora.inject(model, FullConfig())
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)  # also moves the tied lm_head
    adapted.save(tmp_path / "full")
    saved = load_tensors(tmp_path / "full" / "adapter.safetensors")
    assert "lm_head.weight" not in saved and "transformer.wte.weight" in saved
    fresh = GPT2.make(seed=5)
    loaded = increlora.load_adapter(fresh, tmp_path / "full")
    inputs = GPT2.inputs()
    with torch.no_grad():
        torch.testing.assert_close(GPT2.output(fresh, inputs), GPT2.output(model, inputs))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert loaded.num_trainable_parameters() == adapted.num_trainable_parameters()


def test_loading_into_another_architecture_names_the_problem(tmp_path):
    increlora.inject(GPT2.make(), FullConfig()).save(tmp_path / "full")
    with pytest.raises(AdapterFileError, match="do not fit"):
        increlora.load_adapter(MODEL_CASES["mlp"].make(), tmp_path / "full")


@pytest.mark.parametrize("field", ["target_modules", "modules_to_save"])
def test_module_selection_is_rejected(field):
    with pytest.raises(ConfigError, match=field):
        FullConfig(**{field: ["query"]})
