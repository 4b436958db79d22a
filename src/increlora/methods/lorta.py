"""LoRTA (Hounie et al. 2024, arXiv 2410.04060): all updates as one low-rank CP tensor.

The updates of every adapted matrix form one tensor with modes (model side d, head-block
side d_h, head block, layer, matrix type), parameterized by a CP decomposition of rank R:

    delta[l, m][head h] = (alpha / R) sum_k C_block[h,k] C_layer[l,k] C_matrix[m,k] b_k a_k^T

trained parameters: ``R (d + d_h + n_blocks + L + M)`` for the whole model (see
:mod:`increlora.layers.lorta`). Modules are grouped by ``layer_pattern`` (group 1 = layer
index; the name with the index blanked out = matrix type).

The paper adapts the attention matrices Q, K, V, O (heads on the output side of Q/K/V and on
the input side of O). Extensions chosen here, where the paper is silent:

* any matrix with one side equal to the hidden size takes part; its other side is cut into
  blocks of ``block_size`` (the head dimension), so an FFN matrix d x 4d has 4H blocks and
  the block mode has as many entries as the widest matrix needs (attention matrices use
  the first H);
* a square matrix has its blocks on the output side unless its name ends in one of
  ``heads_on_input`` (output projections);
* ``factor_init``: the official code draws C_block, C_layer, C_matrix Kaiming-uniform
  (``'kaiming'``); ``'ones'`` starts them at 1 (one LoRA shared by all matrices). A is
  Kaiming-uniform and B zero, so the update starts at zero either way.

Each module's update is ``(B-side factor) @ (A-side factor)`` of rank <= R, so the adapter is
exportable to PEFT LoRA (rank R per module; the export stores every module's factors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..config import AdapterConfig, ConfigError, option, require
from ..layers.base import base_shape
from ..layers.lorta import LoRTAFactors, LoRTALayer
from .base import Method, register

OUTPUT_PROJECTIONS = ["attention.output.dense", "o_proj", "attn.c_proj", "attn.o", "out_proj"]


@dataclass
class LoRTAConfig(AdapterConfig):
    """LoRTA: one CP tensor of rank ``r`` shared by every adapted matrix of the model."""

    r: int = option(16, "CP rank R of the shared update tensor.")
    layer_pattern: str = option(
        r"\.(\d+)\.",
        "Regex searched in each module name; group 1 is the layer index and the name with it"
        " blanked out is the matrix type.",
    )
    hidden_size: int | None = option(
        None, "Model-side width d; None: the model config's hidden_size."
    )
    block_size: int | None = option(
        None, "Head block width d_h; None: the model config's head_dim (hidden / heads)."
    )
    heads_on_input: list[str] = option(
        OUTPUT_PROJECTIONS,
        "Name suffixes of square matrices whose head blocks lie on the input side.",
    )
    factor_init: Literal["kaiming", "ones"] = option(
        "kaiming", "Init of C_block, C_layer, C_matrix: Kaiming-uniform (official code) or 1."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.r >= 1, "r", f"must be a positive integer, got {self.r}")
        try:
            groups = re.compile(self.layer_pattern).groups
        except re.error as err:
            raise ConfigError(f"layer_pattern: not a regular expression ({err})") from err
        require(groups >= 1, "layer_pattern", "needs a group capturing the layer index")
        for name in ("hidden_size", "block_size"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be positive, got {value}")
        require(
            self.factor_init in ("kaiming", "ones"),
            "factor_init",
            f"must be 'kaiming' or 'ones', got {self.factor_init!r}",
        )


def _model_widths(model: nn.Module, config: LoRTAConfig) -> tuple[int, int]:
    """(hidden size d, head width d_h) from the config, else from the model's config."""
    model_config = getattr(model, "config", None)
    hidden = config.hidden_size or getattr(model_config, "hidden_size", None)
    block = config.block_size or getattr(model_config, "head_dim", None)
    heads = getattr(model_config, "num_attention_heads", None)
    if block is None and hidden is not None and heads:
        block = hidden // heads
    if hidden is None or block is None:
        raise ConfigError(
            "hidden_size/block_size: this model has no config giving its hidden size and head"
            " width; set LoRTAConfig(hidden_size=..., block_size=...)"
        )
    return hidden, block


@register
class LoRTA(Method):
    name = "lorta"
    config_class = LoRTAConfig
    peft_exportable = True
    size_field = "r"

    def build_layers(self, model: nn.Module, names: list[str]) -> dict[str, LoRTALayer]:
        config: LoRTAConfig = self.config
        hidden, block = _model_widths(model, config)
        pattern = re.compile(config.layer_pattern)
        slots: dict[str, tuple[int, str, bool, int]] = {}
        unparsed, misfit = [], []
        for name in names:
            found = pattern.search(name)
            if found is None:
                unparsed.append(name)
                continue
            d_out, d_in = base_shape(model.get_submodule(name))
            output_projection = any(
                name == s or name.endswith("." + s) for s in config.heads_on_input
            )
            on_input = d_out == hidden and (d_in != hidden or output_projection)
            head_width = d_in if on_input else d_out
            if hidden not in (d_in, d_out) or head_width % block:
                misfit.append(f"{name} ({d_in}->{d_out})")
                continue
            kind = name[: found.start(1)] + "*" + name[found.end(1) :]
            slots[name] = (int(found.group(1)), kind, on_input, head_width // block)
        if unparsed:
            raise ConfigError(
                f"layer_pattern: LoRTA groups modules by layer, but {config.layer_pattern!r}"
                f" finds no layer index in {unparsed[:5]}; set layer_pattern to a regex whose"
                " group 1 captures the layer number in these names"
            )
        if misfit:
            raise ConfigError(
                f"target_modules: LoRTA needs one side of every matrix equal to the hidden size"
                f" {hidden} and the other a multiple of the head width {block}; these are not:"
                f" {misfit[:5]} (set hidden_size/block_size or exclude them)"
            )
        # The layer mode follows depth; matrix types are numbered in order of appearance.
        layer_pos = {raw: i for i, raw in enumerate(sorted({s[0] for s in slots.values()}))}
        matrix_pos = {kind: i for i, kind in enumerate(dict.fromkeys(s[1] for s in slots.values()))}
        factors = LoRTAFactors(
            rank=config.r,
            hidden_size=hidden,
            block_size=block,
            n_blocks=max(s[3] for s in slots.values()),
            n_layers=len(layer_pos),
            n_matrices=len(matrix_pos),
            factor_init=config.factor_init,
            device=model.get_submodule(names[0]).weight.device,
        )
        return {
            name: LoRTALayer(
                model.get_submodule(name),
                factors,
                owner=i == 0,
                layer=layer_pos[raw],
                matrix=matrix_pos[kind],
                heads_on_input=on_input,
                block_size=block,
                scaling=config.alpha / config.r,
                dropout=config.dropout,
            )
            for i, (name, (raw, kind, on_input, _)) in enumerate(slots.items())
        }
