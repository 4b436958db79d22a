"""IncreLoRA as a PEFT method: get_peft_model -> grow -> save_pretrained -> from_pretrained.

References are independent of the code under test: the reloaded model's logits are compared
with the trained model's, the exported plain LoRA is loaded by PEFT alone in a process where
increlora is never imported, and merge_and_unload is compared with the adapter's forward.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import MODEL_CASES

from increlora import ConfigError
from increlora.layers import TripletLayer

peft = pytest.importorskip("peft")
from increlora.integrations import IncreLoraConfig, export_lora  # noqa: E402
from increlora.integrations.peft_method import IncreLoraLayer, find_tuner  # noqa: E402

STEPS = 8  # rounds at 2..8 (top_h=2): 12 modules grow from rank 1 to average 2


def _config(**overrides) -> IncreLoraConfig:
    fields = dict(
        target_modules=MODEL_CASES["bert"].targets, target_rank=2, init_warmup=1, interval=1,
        top_h=2, lora_alpha=4, task_type="SEQ_CLS", orth_reg_weight=0.5,
    )  # fmt: skip
    return IncreLoraConfig(**{**fields, **overrides})


def _train(model, steps: int = STEPS):
    """Plain PyTorch loop with the controller (the one-line API) on a PEFT model."""
    tuner = find_tuner(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    controller = tuner.adapted.controller(optimizer, total_steps=steps)
    inputs = MODEL_CASES["bert"].inputs()
    labels = torch.tensor([0, 1, 1, 0])
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss + controller.regularization_loss()
        loss.backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = peft.get_peft_model(MODEL_CASES["bert"].make(), _config())
    _train(model)
    path = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(path)
    return model, path


def test_get_peft_model_uses_the_triplet_layers(trained):
    model, _ = trained
    assert isinstance(model, peft.PeftModelForSequenceClassification)
    layers = [m for m in model.modules() if isinstance(m, IncreLoraLayer)]
    assert len(layers) == 12 and all(isinstance(m, TripletLayer) for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "classifier" in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)  # PEFT's SEQ_CLS head


def test_growth_happened_and_print_trainable_parameters_works(trained, capsys):
    model, _ = trained
    ranks = find_tuner(model).rank_pattern()
    assert sum(ranks.values()) == 24 and max(ranks.values()) > 1
    model.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out


def test_from_pretrained_gives_identical_logits_ranks_and_allocator_state(trained):
    model, path = trained
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "INCRELORA" and saved["target_rank"] == 2
    reloaded = peft.PeftModel.from_pretrained(MODEL_CASES["bert"].make(), path).eval()
    inputs = MODEL_CASES["bert"].inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0
        )
    tuner, original = find_tuner(reloaded), find_tuner(model)
    assert tuner.rank_pattern() == original.rank_pattern()
    state = tuner.pending_controller_state
    expected = original.adapted.current.state_dict()
    assert state["history"] == expected["history"] and state["ranks"] == expected["ranks"]
    torch.testing.assert_close(state["ema"]["sensitivity"], expected["ema"]["sensitivity"])
    # inference mode: nothing trains after a plain from_pretrained
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_merge_and_unload_and_disabled_adapter(trained):
    model, path = trained
    reloaded = peft.PeftModel.from_pretrained(MODEL_CASES["bert"].make(), path).eval()
    inputs = MODEL_CASES["bert"].inputs()
    base = MODEL_CASES["bert"].make().eval()
    with torch.no_grad():
        expected = reloaded(**inputs).logits
        with reloaded.disable_adapter():
            torch.testing.assert_close(reloaded(**inputs).logits, base(**inputs).logits)
        merged = reloaded.merge_and_unload()
        assert not any(isinstance(m, IncreLoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=1e-5)


def assert_peft_alone_matches(model, adapter: Path, work: Path) -> None:
    """The tiny BERT + ``adapter`` loaded by PEFT in a process that never imports increlora
    (the subprocess asserts it) gives ``model``'s logits."""
    inputs = MODEL_CASES["bert"].inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save(inputs["input_ids"], work / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from conftest import MODEL_CASES
        from peft import PeftModel
        model = PeftModel.from_pretrained(MODEL_CASES["bert"].make(), {str(adapter)!r})
        ids = torch.load({str(work / "ids.pt")!r})
        with torch.no_grad():
            logits = model.eval()(input_ids=ids).logits
        assert "increlora" not in sys.modules, "increlora was imported"
        print(logits.tolist())
        """
    )
    tests = Path(__file__).parent
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tests, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    logits = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_exported_lora_loads_with_peft_alone(trained, tmp_path):
    model, _ = trained
    config = export_lora(model, tmp_path / "lora")
    assert config["peft_type"] == "LORA" and config["rank_pattern"]
    assert_peft_alone_matches(model, tmp_path / "lora", tmp_path)


def test_unknown_field_is_a_one_line_error():
    with pytest.raises(ConfigError) as err:
        IncreLoraConfig(target_rank=2, targt_modules=["query"])
    message = str(err.value)
    assert "\n" not in message and "'targt_modules' -> 'target_modules'" in message


def test_impossible_budget_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^IncreLoraConfig: target_rank: must be >= init_rank"):
        IncreLoraConfig(target_rank=1, init_rank=2)
    config = _config(target_rank=40)  # more than the modules can hold
    with pytest.raises(ConfigError) as err:
        peft.get_peft_model(MODEL_CASES["bert"].make(), config)
    assert "\n" not in str(err.value) and "raise max_rank or lower target_rank" in str(err.value)


def test_peft_spellings_map_onto_the_package_config():
    config = _config(lora_alpha=8, lora_dropout=0.1)
    ours = config.to_increlora_config()
    assert (ours.alpha, ours.dropout, ours.target_rank) == (8, 0.1, 2)
    with pytest.raises(ConfigError, match=r"^IncreLoraConfig: lora_dropout: must be in \[0, 1\)"):
        _config(lora_dropout=1.5)


def test_a_second_adapter_is_refused():
    model = peft.get_peft_model(MODEL_CASES["bert"].make(), _config())
    with pytest.raises(ValueError, match="one IncreLoRA adapter"):
        model.add_adapter("other", _config())


def test_importing_increlora_registers_the_method_whenever_peft_is_imported():
    # transformers probes find_spec("peft") before importing it; registration must survive that.
    script = textwrap.dedent(
        """
        import importlib.util, sys
        import increlora
        assert "peft" not in sys.modules
        importlib.util.find_spec("peft")
        import peft.mapping
        assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["INCRELORA"].__name__ == "IncreLoraConfig"
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
