"""The shared test matrix: every (tiny model x method) runs through the same checks.

To add a method: one entry in METHOD_CASES (a config factory and the steps to train).
References are independent of the code under test: a deep copy of the untouched base model,
plain PEFT loading the export, and the dense ``x @ (W0 + delta)^T`` computation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import MODEL_CASES, ModelCase

import increlora
from increlora import IncreLoRAConfig
from increlora.methods.adalora import AdaLoRAConfig
from increlora.methods.full import FullConfig
from increlora.methods.lora import LoRAConfig
from increlora.methods.lora_mini import LoRAMiniConfig
from increlora.methods.lorta import LoRTAConfig
from increlora.methods.melora import MELoRAConfig
from increlora.methods.mora import MoRAConfig
from increlora.methods.peft_reference import PeftAdaLoRAConfig, PeftLoRAConfig
from increlora.methods.prilora import PRILoRAConfig
from increlora.methods.sora import SoRAConfig


@dataclass
class MethodCase:
    name: str
    make_config: Callable[[ModelCase], increlora.AdapterConfig]
    steps: int = 6
    lr: float = 0.05
    skip: dict[str, str] = field(default_factory=dict)  # check name -> why it does not apply


def _increlora(case: ModelCase) -> IncreLoRAConfig:
    return IncreLoRAConfig(
        target_modules=case.targets,
        modules_to_save=case.modules_to_save,
        target_rank=2,
        init_warmup=1,
        interval=1,
        top_h=2,
        alpha=4,
    )


def _adapter_fields(case: ModelCase) -> dict:
    return {"target_modules": case.targets, "modules_to_save": case.modules_to_save, "alpha": 4}


def _lorta(case: ModelCase) -> LoRTAConfig:
    # The MLP has no model config and no dotted layer index: say how to group its layers.
    mlp = {"layer_pattern": r"lin(\d+)", "hidden_size": 16, "block_size": 4}
    return LoRTAConfig(r=4, **_adapter_fields(case), **(mlp if case.name == "mlp" else {}))


_FULL_SKIPS = {
    "test_only_adapter_parameters_change": "full fine-tuning freezes nothing",
    "test_disabled_gives_base_outputs": "full fine-tuning has no separate adapter to disable",
    "test_forward_equals_dense_reference": "full fine-tuning has no adapter layers",
    "test_inject_into_bf16_model_keeps_fp32_adapters": "full fine-tuning trains the model dtype",
}

_PEFT_SKIPS = {
    "test_disabled_gives_base_outputs": "PEFT's disable_adapter also restores modules_to_save",
    "test_forward_equals_dense_reference": "PEFT's own layers (no delta_weight)",
    "test_inject_into_bf16_model_keeps_fp32_adapters": "PEFT's own layers (tests/test_methods_peft)",
}

METHOD_CASES: dict[str, MethodCase] = {
    "increlora": MethodCase("increlora", _increlora),
    "lora": MethodCase("lora", lambda c: LoRAConfig(r=2, **_adapter_fields(c))),
    "lora-mini": MethodCase(
        "lora-mini", lambda c: LoRAMiniConfig(r=2, outer_rank=4, **_adapter_fields(c))
    ),
    "melora": MethodCase("melora", lambda c: MELoRAConfig(r=4, n=2, **_adapter_fields(c))),
    "mora": MethodCase("mora", lambda c: MoRAConfig(r=2, **_adapter_fields(c))),
    "lorta": MethodCase("lorta", _lorta),
    "full": MethodCase("full", lambda c: FullConfig(), lr=0.01, skip=_FULL_SKIPS),
    "adalora": MethodCase(
        "adalora", lambda c: AdaLoRAConfig(target_rank=2, init_rank=4, **_adapter_fields(c))
    ),
    "sora": MethodCase(
        "sora", lambda c: SoRAConfig(max_rank=4, sparsity=2.0, **_adapter_fields(c))
    ),
    "prilora": MethodCase(
        "prilora",
        lambda c: PRILoRAConfig(r_start=1, r_end=3, prune_interval=2, **_adapter_fields(c)),
    ),
    "peft-lora": MethodCase(
        "peft-lora", lambda c: PeftLoRAConfig(r=2, **_adapter_fields(c)), skip=_PEFT_SKIPS
    ),
    "peft-adalora": MethodCase(
        "peft-adalora",
        lambda c: PeftAdaLoRAConfig(target_rank=2, init_rank=4, **_adapter_fields(c)),
        skip=_PEFT_SKIPS,
    ),
}


def train(case: ModelCase, method: MethodCase, model, adapted, steps: int | None = None):
    """A few AdamW steps (with weight decay) so adapters are far from their init."""
    steps = steps or method.steps
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=method.lr, weight_decay=0.1)
    controller = adapted.controller(optimizer, total_steps=steps + 10)
    inputs = case.inputs(seed=2)
    model.train()
    for _ in range(steps):
        loss = case.loss(model, inputs) + controller.regularization_loss()
        loss.backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    model.eval()
    return controller


@pytest.fixture(params=sorted(METHOD_CASES))
def method_case(request) -> MethodCase:
    return METHOD_CASES[request.param]


@pytest.fixture(autouse=True)
def _skip_inapplicable(request):
    """Skip the checks a method case marks as not applying to it, with its reason."""
    if "method_case" in request.fixturenames:
        reason = request.getfixturevalue("method_case").skip.get(request.function.__name__)
        if reason:
            pytest.skip(reason)


@pytest.fixture
def trained(model_case: ModelCase, method_case: MethodCase):
    model = model_case.make()
    base = copy.deepcopy(model)
    adapted = increlora.inject(model, method_case.make_config(model_case))
    train(model_case, method_case, model, adapted)
    return model_case, method_case, model, adapted, base


def test_only_adapter_parameters_change(trained):
    case, _, model, adapted, base = trained
    trainable = {n for n, _ in adapted.named_trainable_parameters()}
    base_state = base.state_dict()
    changed = set()
    for name, tensor in model.state_dict().items():
        plain = name.replace(".base_layer", "")
        if name in trainable or plain not in base_state:
            continue
        if not torch.equal(tensor, base_state[plain]):
            changed.add(name)
    assert not changed, f"frozen tensors changed: {sorted(changed)[:5]}"
    assert trainable, "nothing was trainable"
    saved = [n for n in trainable if any(n.startswith(m + ".") for m in adapted.saved_modules)]
    assert bool(saved) == bool(case.modules_to_save)


def test_adapter_changes_the_output(trained):
    case, _, model, _, base = trained
    inputs = case.inputs()
    with torch.no_grad():
        assert not torch.allclose(case.output(model, inputs), case.output(base, inputs))


def test_disabled_gives_base_outputs(trained):
    case, _, model, adapted, base = trained
    inputs = case.inputs()
    with torch.no_grad(), adapted.disabled():
        out = case.output(model, inputs)
    # modules_to_save are trained in full: compare with them copied into the reference.
    for name in adapted.saved_modules:
        base.get_submodule(name).load_state_dict(model.get_submodule(name).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(out, case.output(base, inputs), rtol=0, atol=1e-6)


def test_forward_equals_dense_reference(trained):
    _, _, _, adapted, _ = trained
    torch.manual_seed(3)
    for layer in adapted.layers.values():
        x = torch.randn(5, layer.in_features)
        weight = layer.base_layer.weight
        w0 = weight.T if layer.fan_in_fan_out else weight
        expected = x @ (w0 + layer.delta_weight()).T
        if layer.base_layer.bias is not None:
            expected = expected + layer.base_layer.bias
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_merge_unmerge_and_unload(trained):
    case, _, model, adapted, _ = trained
    inputs = case.inputs()
    with torch.no_grad():
        expected = case.output(model, inputs)
        weights = {n: layer.base_layer.weight.clone() for n, layer in adapted.layers.items()}
        adapted.merge()
        torch.testing.assert_close(case.output(model, inputs), expected, rtol=1e-5, atol=1e-5)
        adapted.unmerge()
        for name, layer in adapted.layers.items():
            torch.testing.assert_close(layer.base_layer.weight, weights[name], rtol=0, atol=1e-6)
        unloaded = adapted.merge_and_unload()
        assert not any(isinstance(m, increlora.layers.AdapterLayer) for m in unloaded.modules())
        torch.testing.assert_close(case.output(unloaded, inputs), expected, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_exact(trained, tmp_path):
    case, method, model, adapted, _ = trained
    adapted.save(tmp_path / "adapter")
    fresh = case.make()
    if method.name.startswith("peft-"):  # PEFT's own methods save in PEFT's format
        peft = pytest.importorskip("peft")
        reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        # PEFT reloads AdaLoRA with its masked triplets cut out (other shapes, so another
        # summation order: ~6e-8 apart); LoRA reloads bit for bit.
        atol = 0 if method.name == "peft-lora" else 1e-6
        inputs = case.inputs()
        with torch.no_grad():
            torch.testing.assert_close(
                case.output(reloaded, inputs), case.output(model, inputs), rtol=0, atol=atol
            )
        return
    loaded = increlora.load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    inputs = case.inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            case.output(fresh, inputs), case.output(model, inputs), rtol=0, atol=0
        )
    assert loaded.rank_pattern() == adapted.rank_pattern()
    assert loaded.num_trainable_parameters() == adapted.num_trainable_parameters()


def test_peft_export_reloads_with_same_outputs(trained, tmp_path):
    peft = pytest.importorskip("peft")
    case, _, model, adapted, _ = trained
    if not adapted.method.peft_exportable:
        with pytest.raises(NotImplementedError):
            adapted.export_peft(tmp_path / "peft")
        return
    adapted.export_peft(tmp_path / "peft")
    base = case.make()
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
    reloaded.eval()
    inputs = case.inputs()
    with torch.no_grad():
        diff = (case.output(reloaded, inputs) - case.output(model, inputs)).abs().max()
    assert diff <= 1e-5
    peft_ranks = {
        n.removeprefix("base_model.model."): m.r["default"]
        for n, m in reloaded.named_modules()
        if hasattr(m, "lora_A") and getattr(m, "r", {}).get("default")
    }
    # Rank-0 modules (AdaLoRA masked all their triplets) are exported as exclude_modules.
    assert peft_ranks == {n: r for n, r in adapted.rank_pattern().items() if r}


def _half_inputs(case: ModelCase, inputs: dict) -> dict:
    return {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}


def test_bf16_forward_matches_fp32(trained):
    case, _, model, _, _ = trained
    inputs = case.inputs()
    with torch.no_grad():
        reference = case.output(model, inputs).float()
        half = copy.deepcopy(model).to(torch.bfloat16)
        out = case.output(half, _half_inputs(case, inputs)).float()
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max() <= 0.05 * reference.abs().max().clamp(min=1.0)


def test_inject_into_bf16_model_keeps_fp32_adapters(model_case, method_case):
    model = model_case.make().to(torch.bfloat16)
    adapted = increlora.inject(model, method_case.make_config(model_case))
    params = [p for layer in adapted.layers.values() for p in layer.adapter_parameters()]
    assert params and all(p.dtype == torch.float32 for p in params)
    model.train()
    loss = model_case.loss(model, _half_inputs(model_case, model_case.inputs()))
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("case_name", sorted(MODEL_CASES))
def test_matrix_covers_the_architectures(case_name):
    """Injection finds the requested modules on each architecture (incl. GPT-2 Conv1D)."""
    case = MODEL_CASES[case_name]
    model = case.make()
    adapted = increlora.inject(model, _increlora(case))
    assert adapted.layers
    for name in adapted.layers:
        assert any(name == t or name.endswith("." + t) for t in case.targets)


def test_export_of_an_all_rank_zero_adapter_is_a_clear_error(tmp_path):
    from increlora.export import EmptyAdapterError
    from increlora.methods.adalora import AdaLoRAConfig

    case = MODEL_CASES["mlp"]
    adapted = increlora.inject(case.make(), AdaLoRAConfig(target_modules=["lin0"], target_rank=2))
    with torch.no_grad():
        for layer in adapted.layers.values():  # every triplet masked, as AdaLoRA may do
            layer.kept.zero_()
            layer.lora_E.zero_()
    with pytest.raises(EmptyAdapterError, match="rank 0"):
        adapted.export_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
