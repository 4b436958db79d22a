"""Tiny seeded models built from configs (no downloads), shared by the test matrix."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

# Tiny models: one thread is faster than two (no inter-op overhead), and CI has 2 cores.
torch.set_num_threads(1)


class TinyMLP(nn.Module):
    """A plain PyTorch model (no transformers config), like PEFT's custom-model tests."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 16)
        self.lin1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(cfg)


@dataclass
class ModelCase:
    """A tiny model, how to call it, and which modules the test adapts / fully trains."""

    name: str
    build: Any
    targets: list[str]
    modules_to_save: list[str]

    def make(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = self.build()
        model.eval()  # no dropout: outputs are comparable
        return model

    def inputs(self, seed: int = 1) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        if self.name == "mlp":
            return {"x": torch.randn(6, 12, generator=g)}
        return {"input_ids": torch.randint(0, 64, (4, 9), generator=g)}

    def output(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**inputs)
        return out if torch.is_tensor(out) else out.logits

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.output(model, inputs)
        return out.float().pow(2).mean() if self.name == "mlp" else out.float().logsumexp(-1).mean()


MODEL_CASES = {
    "mlp": ModelCase("mlp", TinyMLP, ["lin0", "lin1"], ["head"]),
    "bert": ModelCase(
        "bert",
        tiny_bert,
        ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
        ["classifier"],
    ),
    "llama": ModelCase("llama", tiny_llama, ["q_proj", "v_proj", "down_proj", "up_proj"], []),
    "gpt2": ModelCase("gpt2", tiny_gpt2, ["c_attn", "c_fc", "attn.c_proj"], []),
}


@pytest.fixture(params=sorted(MODEL_CASES))
def model_case(request) -> ModelCase:
    return MODEL_CASES[request.param]


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# --------------------------------------------------------------------- skip allowance
# A skip hides a check. CI (.ci/run) runs `pytest -rs --max-skips tests/skip_allowance.txt`:
# every skip reason is printed, and more skips than the recorded allowance fail the run (a
# missing test dependency, a new environment check that never runs). Plain `pytest` is not
# limited.
_SKIPPED: set[str] = set()
_OVER_ALLOWANCE = pytest.StashKey[str]()


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--max-skips",
        default=None,
        metavar="N_OR_FILE",
        help="fail when more tests skip than N (or the number in this file)",
    )


def _skip_allowance(value: str) -> int:
    text = value
    if not value.strip().isdigit():
        with open(value, encoding="utf-8") as handle:
            text = next((line for line in handle if line.strip() and not line.startswith("#")), "")
    try:
        return int(text.strip())
    except ValueError:
        raise pytest.UsageError(f"--max-skips {value}: expected a number, got {text!r}") from None


def pytest_runtest_logreport(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.add(report.nodeid)


def pytest_sessionfinish(session, exitstatus) -> None:
    value = session.config.getoption("--max-skips")
    if value is None:
        return
    allowance = _skip_allowance(value)
    if len(_SKIPPED) > allowance:
        session.config.stash[_OVER_ALLOWANCE] = (
            f"{len(_SKIPPED)} tests skipped, more than the allowance of {allowance}"
            f" (--max-skips {value}). The reasons are listed above (-rs): install what is"
            " missing (pip install -c constraints.txt -e '.[test]'), or, for an intended new"
            " skip, raise the recorded number."
        )
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    message = config.stash.get(_OVER_ALLOWANCE, None)
    if message:
        terminalreporter.write_line(message, red=True, bold=True)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test starts without accelerate's process-wide state: a transformers Trainer
    (test_callback, test_trainer) leaves an AcceleratorState behind, and the runner's next
    Accelerator with other settings would be refused."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
