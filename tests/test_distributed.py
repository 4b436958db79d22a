"""Growth under 2-process DDP and FSDP2 (CPU, gloo) against one process over the same batches.

One pair of processes (forked once per session: no re-import) runs every distributed case:
DDP and FSDP2, each with the proxy and the paper importance, gradient accumulation of 2
micro-batches per process, and an FSDP2 checkpoint resume. Each process writes its final
whole (gathered) adapter weights and allocator state; the tests compare them across processes,
with a single-process run over the same global batches, and between DDP and FSDP2.

Tolerance against one process: 1e-5 absolute (float32 sums in another order through a
dozen AdamW steps); growth decisions, ranks and the processes among themselves: exact.
"""

from __future__ import annotations

import socket
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TinyMLP

import increlora
from increlora import IncreLoRAConfig
from increlora.checkpoint import load_training_state, save_training_state
from increlora.distributed import gathered_parameters
from increlora.io import load_state, save_state

WORLD = 2
ACCUM = 2  # micro-batches per process and optimizer step
MICRO = 2  # rows per micro-batch
GLOBAL_BATCH = WORLD * ACCUM * MICRO
STEPS = 12
RESUME_AT = 7  # mid-growth (rounds at steps 4, 6, 8, 10)
IMPORTANCES = ("proxy", "paper")


def make_config(importance: str, storage: str = "auto") -> IncreLoRAConfig:
    # Capacity 5 splits 3 + 2 over two processes (uneven shards), and growth from rank 1 to
    # 3-4 crosses the shard boundary of A and e. FSDP2 shards once: static storage; the
    # single-process and DDP runs re-allocate at every round (dynamic, the default), so DDP's
    # reducer is rebuilt four times and must still average the gradients exactly.
    return IncreLoRAConfig(
        target_modules=["lin0", "lin1"], modules_to_save=["head"], target_rank=3, max_rank=5,
        init_warmup=2, interval=2, top_h=1, alpha=4, importance=importance, storage=storage,
    )  # fmt: skip


def global_batch(step: int) -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 12, generator=torch.Generator().manual_seed(step))


class Run:
    """One training run: ``single`` (the global batch at once), ``accum`` (one process,
    WORLD * ACCUM micro-batches accumulated), ``ddp`` or ``fsdp`` (ACCUM per process)."""

    def __init__(self, mode: str, importance: str) -> None:
        torch.manual_seed(0)
        self.mode = mode
        self.model = TinyMLP()
        storage = "static" if mode == "fsdp" else "auto"
        self.adapted = increlora.inject(self.model, make_config(importance, storage))
        self.forward = self.model
        if mode == "ddp":
            self.forward = torch.nn.parallel.DistributedDataParallel(self.model)
        elif mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in self.adapted.layers.values():
                fully_shard(layer)  # non-root groups: sharded again right after forward
            fully_shard(self.model)
        # Built after wrapping: FSDP2 replaces the parameters by sharded ones.
        self.optimizer = torch.optim.AdamW(
            self.adapted.trainable_parameters(), lr=0.02, weight_decay=0.1
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: 1 - t / (STEPS + 1)
        )
        self.controller = self.adapted.controller(self.optimizer, total_steps=STEPS)

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        x = global_batch(step)
        if self.mode == "single":
            return [x]
        if self.mode == "accum":
            return list(x.split(MICRO))
        rank = dist.get_rank()
        return [x[(rank * ACCUM + m) * MICRO :][:MICRO] for m in range(ACCUM)]

    def sync(self, last: bool) -> Any:
        if self.mode == "ddp" and not last:
            return self.forward.no_sync()
        if self.mode == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return nullcontext()

    def train(self, start: int, stop: int) -> None:
        for step in range(start, stop):
            batches = self.micro_batches(step)
            for m, x in enumerate(batches):
                with self.sync(m == len(batches) - 1):
                    loss = self.forward(x).pow(2).mean() + self.controller.regularization_loss()
                    (loss / len(batches)).backward()
            self.optimizer.step()
            self.controller.step()
            self.scheduler.step()
            self.optimizer.zero_grad()

    def result(self) -> dict:
        """Whole weights and allocator state (collective under FSDP: every process calls it)."""
        with gathered_parameters(self.model), torch.no_grad():
            weights = {n: p.detach().clone() for n, p in self.adapted.named_trainable_parameters()}
        return {"weights": weights, "allocator": self.controller.state_dict()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        for importance in IMPORTANCES:
            for mode in ("ddp", "fsdp"):
                run = Run(mode, importance)
                run.train(0, STEPS)
                save_state(out, f"{mode}-{importance}-rank{rank}", run.result())
                if importance == "proxy":
                    with gathered_parameters(run.model):
                        if rank == 0:
                            run.adapted.export_peft(out / f"{mode}-peft")
        # FSDP2 checkpoint: stop mid-growth, rebuild everything, resume.
        run = Run("fsdp", "proxy")
        run.train(0, RESUME_AT)
        save_training_state(
            out / "fsdp-ckpt", run.adapted, run.optimizer, run.controller, run.scheduler
        )
        dist.barrier()  # the main process wrote the files
        resumed = Run("fsdp", "proxy")
        load_training_state(
            out / "fsdp-ckpt", resumed.adapted, resumed.optimizer, resumed.controller,
            resumed.scheduler,
        )  # fmt: skip
        resumed.train(RESUME_AT, STEPS)
        save_state(out, f"fsdp-resumed-rank{rank}", resumed.result())
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("distributed")
    # fork: the children reuse this process's imports (spawning re-imports torch and
    # transformers, ~10 s per process on 2 cores).
    mp.start_processes(
        _worker, args=(_free_port(), out), nprocs=WORLD, join=True, start_method="fork"
    )
    found: dict[str, Any] = {"dir": out}
    for importance in IMPORTANCES:
        single = Run("single", importance)
        single.train(0, STEPS)
        found[f"single-{importance}"] = single.result()
        if importance == "proxy":
            found["single-model"] = single.model
        for mode in ("ddp", "fsdp"):
            for rank in range(WORLD):
                found[f"{mode}-{importance}-rank{rank}"] = load_state(
                    out, f"{mode}-{importance}-rank{rank}"
                )
    for rank in range(WORLD):
        found[f"fsdp-resumed-rank{rank}"] = load_state(out, f"fsdp-resumed-rank{rank}")
    return found


def _assert_same(a: Any, b: Any, path: str = "", atol: float = 0.0) -> None:
    """Nested equality; tensors within ``atol`` (exact by default)."""
    if torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=path)
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}", atol)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]", atol)
    elif isinstance(a, float) and atol:
        assert abs(a - b) <= atol * max(1.0, abs(a)), path
    else:
        assert a == b, path


def _in_use(result: dict) -> dict:
    """Weights restricted to the ranks in use (static storage also holds zero rows past them)."""
    weights = dict(result["weights"])
    for name, (_, used) in zip(result["allocator"]["names"], result["allocator"]["ranks"]):
        weights[f"{name}.lora_A"] = weights[f"{name}.lora_A"][:used]
        weights[f"{name}.lora_E"] = weights[f"{name}.lora_E"][:used]
        weights[f"{name}.lora_B"] = weights[f"{name}.lora_B"][:, :used]
    return weights


def _decisions(state: dict) -> list[tuple[int, list[tuple[str, int]]]]:
    return [(e["step"], [(g["module"], g["rank"]) for g in e["grown"]]) for e in state["history"]]


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_accumulation_scores_and_grows_like_the_large_batch(importance):
    """4 micro-batches of 2 per optimizer step against batches of 8 without accumulation."""
    accumulated, large = Run("accum", importance), Run("single", importance)
    accumulated.train(0, STEPS)
    large.train(0, STEPS)
    a, b = accumulated.result(), large.result()
    # Scored once per optimizer step (not per micro-batch) until the last round, at step 10.
    assert a["allocator"]["ema"]["updates"] == b["allocator"]["ema"]["updates"] == 10
    assert _decisions(a["allocator"]) == _decisions(b["allocator"])
    torch.testing.assert_close(
        a["allocator"]["ema"]["sensitivity"],
        b["allocator"]["ema"]["sensitivity"],
        rtol=1e-4,
        atol=0,
    )
    _assert_same(b["weights"], a["weights"], "weights", atol=1e-5)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("importance", IMPORTANCES)
def test_every_process_holds_the_same_state(results, mode, importance):
    rank0, rank1 = (results[f"{mode}-{importance}-rank{r}"] for r in range(WORLD))
    _assert_same(rank0, rank1)
    assert len(rank0["allocator"]["history"]) == 4  # rounds at 4, 6, 8, 10 all happened
    assert not rank0["allocator"]["growing"]  # budget 6 ranks reached, reserve dropped


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("importance", IMPORTANCES)
def test_matches_one_process_over_the_global_batch(results, mode, importance):
    single = results[f"single-{importance}"]
    distributed = results[f"{mode}-{importance}-rank0"]
    assert _decisions(distributed["allocator"]) == _decisions(single["allocator"])
    assert distributed["allocator"]["ranks"] == single["allocator"]["ranks"]
    torch.testing.assert_close(
        distributed["allocator"]["ema"]["sensitivity"],
        single["allocator"]["ema"]["sensitivity"],
        rtol=1e-4,
        atol=1e-9,
    )
    _assert_same(_in_use(single), _in_use(distributed), "weights", atol=1e-5)
    if mode == "ddp":  # dynamic storage: the tensors hold the ranks in use and nothing more
        _assert_same(single["weights"], distributed["weights"], "weights", atol=1e-5)


def test_sharded_unused_rows_stay_zero(results):
    state = results["fsdp-proxy-rank0"]
    for name, (active, used) in zip(state["allocator"]["names"], state["allocator"]["ranks"]):
        a = state["weights"][f"{name}.lora_A"]
        b = state["weights"][f"{name}.lora_B"]
        e = state["weights"][f"{name}.lora_E"]
        assert active == used  # growth ended: no reserve
        assert torch.count_nonzero(a[used:]) == 0 and torch.count_nonzero(b[:, used:]) == 0
        assert torch.count_nonzero(e[used:]) == 0
        assert torch.count_nonzero(a[:used].abs().sum(1)) == used


def test_fsdp_resume_mid_growth_equals_uninterrupted(results):
    straight = results["fsdp-proxy-rank0"]
    for rank in range(WORLD):
        _assert_same(straight, results[f"fsdp-resumed-rank{rank}"])


def test_fsdp_export_matches_ddp_and_reloads_in_peft(results):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    out: Path = results["dir"]
    config = {
        m: increlora.io.read_json(out / f"{m}-peft" / "adapter_config.json")
        for m in ("ddp", "fsdp")
    }
    assert config["fsdp"] == config["ddp"]
    tensors = {
        m: load_file(out / f"{m}-peft" / "adapter_model.safetensors") for m in ("ddp", "fsdp")
    }
    assert {k: v.shape for k, v in tensors["fsdp"].items()} == {
        k: v.shape for k, v in tensors["ddp"].items()
    }
    _assert_same(tensors["ddp"], tensors["fsdp"], atol=1e-5)
    torch.manual_seed(0)
    reloaded = peft.PeftModel.from_pretrained(TinyMLP(), out / "fsdp-peft")
    x = global_batch(100)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), results["single-model"](x), rtol=0, atol=1e-5)


def test_dynamic_storage_under_fsdp_is_refused_with_the_fix(monkeypatch):
    """FSDP2 shards parameters once; dynamic storage would re-allocate them: one line that
    names storage='static', and 'auto' picks static when accelerate set up FSDP."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert make_config("proxy").resolved_storage == "static"
    assert make_config("proxy", "dynamic").resolved_storage == "dynamic"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert make_config("proxy").resolved_storage == "dynamic"


def test_flattened_or_partitioned_parameters_are_refused():
    """FSDP1 / ZeRO-3 leave flat views or empty placeholders: refused, never misaddressed."""
    torch.manual_seed(0)
    model = TinyMLP()
    adapted = increlora.inject(model, make_config("proxy"))
    adapted.layers["lin0"].lora_A = torch.nn.Parameter(torch.zeros(0))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    with pytest.raises(increlora.ConfigError, match="FSDP2"):
        adapted.controller(optimizer, total_steps=STEPS)
