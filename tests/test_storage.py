"""Storage that follows the rank in use (issue 24): same math as static storage, exact memory.

``storage="dynamic"`` re-allocates a module's tensors when it grows; ``"static"`` holds the
capacity from the start (the design every benchmark so far ran). Both are run side by side
from the same seed, step by step, over the kinds of run the other tests cover (encoder and
causal LM; with and without reserve ranks; the proxy and the paper score; gradient
accumulation and clipping): same losses, same growth decisions, same weights on the ranks in
use. The reference for the memory claims is a plain count: parameters, gradients and Adam
moments against the adapter parameters the layers say they use.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora import IncreLoRAConfig
from increlora.allocation.storage import fit_optimizer_state, storage_elements
from increlora.checkpoint import load_training_state, save_training_state

STEPS = 14
CASES = [
    # (model, importance, advance_learning, micro-batches per step)
    ("bert", "proxy", True, 1),
    ("bert", "paper", True, 2),
    ("bert", "proxy", False, 1),
    ("llama", "paper", False, 1),
    ("llama", "proxy", True, 2),
]


def config(case: str, storage: str, importance: str = "proxy", advance: bool = True):
    return IncreLoRAConfig(
        target_modules=MODEL_CASES[case].targets,
        modules_to_save=MODEL_CASES[case].modules_to_save,
        target_rank=2.5,
        init_warmup=3,
        interval=2,
        top_h=4,
        alpha=4,
        importance=importance,
        score_rows=1.0,
        advance_learning=advance,
        storage=storage,
    )


class Run:
    def __init__(self, case: str, cfg: IncreLoRAConfig, steps: int = STEPS) -> None:
        self.case = MODEL_CASES[case]
        self.model = self.case.make(seed=0)
        self.adapted = increlora.inject(self.model, cfg)
        self.optimizer = torch.optim.AdamW(
            self.adapted.trainable_parameters(), lr=0.02, weight_decay=0.05
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: 1 - t / (steps + 1)
        )
        self.controller = self.adapted.controller(self.optimizer, total_steps=steps)
        self.losses: list[float] = []
        self.events: list[dict] = []

    def train(self, start: int, stop: int, micro: int = 1, hook=None) -> None:
        for step in range(start, stop):
            for m in range(micro):
                inputs = self.case.inputs(seed=100 * step + m)
                loss = self.case.loss(self.model, inputs) + self.controller.regularization_loss()
                (loss / micro).backward()
            self.losses.append(float(loss))
            torch.nn.utils.clip_grad_norm_(self.adapted.trainable_parameters(), 0.5)
            self.optimizer.step()
            if hook is not None:
                hook(self)
            event = self.controller.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            if event:
                self.events.append(
                    {
                        "step": event["step"],
                        "grown": [(g["module"], g["rank"]) for g in event["grown"]],
                    }
                )

    def in_use(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, the triplets cut to their used ranks."""
        out = {n: p.detach().clone() for n, p in self.adapted.named_trainable_parameters()}
        for name, layer in self.adapted.layers.items():
            u = layer.used_rank
            for key, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                full = f"{name}.{key}"
                if full not in out:
                    full = next(k for k in out if k.endswith(f"{name}.{key}"))
                out[full] = out[full].narrow(dim, 0, u)
        return out


@pytest.mark.parametrize(("case", "importance", "advance", "micro"), CASES)
def test_dynamic_storage_trains_exactly_like_static(case, importance, advance, micro):
    static = Run(case, config(case, "static", importance, advance))
    dynamic = Run(case, config(case, "dynamic", importance, advance))
    for run in (static, dynamic):
        run.train(0, STEPS, micro)
    assert dynamic.events == static.events and len(static.events) >= 3
    assert not dynamic.controller.growing and not static.controller.growing
    torch.testing.assert_close(dynamic.losses, static.losses, rtol=1e-5, atol=1e-6)
    a, b = static.in_use(), dynamic.in_use()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    # Static storage really held more: unused capacity rows (zero) that dynamic never allocated.
    layer_s = next(iter(static.adapted.layers.values()))
    layer_d = next(iter(dynamic.adapted.layers.values()))
    assert layer_s.lora_A.shape[0] == layer_s.capacity > layer_d.lora_A.shape[0]
    assert layer_d.lora_A.shape[0] == layer_d.used_rank


def _elements(run: Run) -> dict[str, int]:
    return storage_elements(list(run.adapted.layers.values()), run.optimizer)


def test_memory_follows_the_rank_in_use():
    """After injection each module holds init_rank + reserve rows; when the budget is reached
    parameters, gradients and both Adam moments hold exactly the parameters in use (static
    storage holds the capacity: 4-5x more here)."""
    counts: dict[str, dict] = {}

    def snapshot(run: Run) -> None:  # after optimizer.step, gradients still present
        storage = next(iter(run.adapted.layers.values())).storage
        counts.setdefault(storage, {})["before_last"] = _elements(run)

    runs = {s: Run("bert", config("bert", s)) for s in ("static", "dynamic")}
    first = runs["dynamic"].adapted.layers
    for layer in first.values():
        assert layer.lora_A.shape == (2, layer.in_features)  # rank 1 + 1 reserve
        assert layer.lora_B.shape == (layer.out_features, 2)
    for run in runs.values():
        run.train(0, STEPS)
        run.train(STEPS, STEPS + 1, hook=snapshot)  # one more step past the budget
        assert not run.controller.growing
    used = runs["dynamic"].controller.num_trainable_parameters()
    assert used == runs["static"].controller.num_trainable_parameters()
    dyn = counts["dynamic"]["before_last"]
    assert dyn == {
        "parameters": used,
        "gradients": used,
        "optimizer_state": 2 * used,
        "score_buffers": 0,
    }
    sta = counts["static"]["before_last"]
    assert sta["parameters"] > 3 * used and sta["optimizer_state"] == 2 * sta["parameters"]


def test_score_buffers_exist_only_while_scoring_and_match_the_gradients():
    """Proxy score: one buffer per A, e, B shaped like the parameter in use (not the capacity),
    only while growing; none once the budget is reached."""
    run = Run("bert", config("bert", "dynamic", "proxy"))
    sizes = []
    run.train(0, 5, hook=lambda r: sizes.append(_elements(r)))
    for c in sizes:
        assert c["score_buffers"] == c["parameters"]
    run.train(5, STEPS)
    assert _elements(run)["score_buffers"] == 0


def test_resume_mid_growth_from_a_dynamic_checkpoint_is_exact(tmp_path):
    cfg = config("bert", "dynamic", "paper")
    straight = Run("bert", cfg)
    straight.train(0, STEPS)
    first = Run("bert", cfg)
    first.train(0, 6)  # rounds at 3 and 5 done: shapes differ between modules
    assert len({layer.rows for layer in first.adapted.layers.values()}) > 1
    save_training_state(
        tmp_path / "ckpt", first.adapted, first.optimizer, first.controller, first.scheduler
    )
    resumed = Run("bert", cfg)
    load_training_state(
        tmp_path / "ckpt", resumed.adapted, resumed.optimizer, resumed.controller, resumed.scheduler
    )
    resumed.losses, resumed.events = list(first.losses), list(first.events)
    resumed.train(6, STEPS)
    assert resumed.events == straight.events
    assert resumed.losses == straight.losses  # bit-identical
    a, b = straight.in_use(), resumed.in_use()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_static_checkpoint_resumes_into_dynamic_storage(tmp_path):
    """Checkpoints written before this change (capacity rows) load and are trimmed."""
    cfg_static, cfg_dynamic = config("bert", "static"), config("bert", "dynamic")
    straight = Run("bert", cfg_static)
    straight.train(0, STEPS)
    first = Run("bert", cfg_static)
    first.train(0, 6)
    save_training_state(
        tmp_path / "ckpt", first.adapted, first.optimizer, first.controller, first.scheduler
    )
    resumed = Run("bert", cfg_dynamic)
    load_training_state(
        tmp_path / "ckpt", resumed.adapted, resumed.optimizer, resumed.controller, resumed.scheduler
    )
    for layer in resumed.adapted.layers.values():
        assert layer.rows == layer.used_rank
    resumed.train(6, STEPS)
    a, b = straight.in_use(), resumed.in_use()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_saved_adapter_and_state_dict_round_trip_with_grown_shapes(tmp_path):
    run = Run("bert", config("bert", "dynamic"))
    run.train(0, STEPS)
    inputs = MODEL_CASES["bert"].inputs(seed=999)
    expected = MODEL_CASES["bert"].output(run.model, inputs)
    run.adapted.save(tmp_path / "adapter")
    fresh = MODEL_CASES["bert"].make(seed=0)
    loaded = increlora.load_adapter(fresh, tmp_path / "adapter")
    for name, layer in loaded.layers.items():
        assert layer.rows == run.adapted.layers[name].rows == layer.used_rank
    torch.testing.assert_close(MODEL_CASES["bert"].output(fresh, inputs), expected)
    # nn.Module state dicts (what the HF Trainer saves and reloads) carry the shapes too.
    again = increlora.inject(MODEL_CASES["bert"].make(seed=0), config("bert", "dynamic"))
    state = copy.deepcopy(run.model.state_dict())
    again.model.load_state_dict(state)
    for name, layer in again.layers.items():
        assert layer.rows == run.adapted.layers[name].rows


def test_an_optimizer_whose_state_cannot_follow_is_refused_in_one_line():
    run = Run("bert", config("bert", "dynamic"))
    layer = next(iter(run.adapted.layers.values()))
    run.optimizer.state[layer.lora_A]["factored"] = torch.zeros(7, 3)
    layer.resize_storage(layer.rows + 1)
    with pytest.raises(increlora.ConfigError, match="storage='static'") as err:
        fit_optimizer_state(run.optimizer, layer)
    assert "\n" not in str(err.value)
