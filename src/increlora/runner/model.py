"""Loading a base model with the head a task needs, and building the method's config for it."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..adapter import AdaptedModel, inject
from ..assets import MODEL_ALIASES, ResolvedModel, resolve_model
from ..config import AdapterConfig
from ..methods import get_method
from ..methods.full import FullConfig
from ..tasks import TaskSpec, is_causal
from .config import MethodSpec

logger = logging.getLogger("increlora.runner")

HEAD_MODULES = ("classifier", "score")
"""Names of sequence-classification heads in transformers (encoders / decoders)."""


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what was tried."""


@dataclass
class LoadedModel:
    """A base model with a task head, its tokenizer, and what must train in full."""

    model: nn.Module
    tokenizer: Any
    resolved: ResolvedModel
    trained_modules: list[str]  # the head and any module the checkpoint did not hold


def load_model(name: str, task: TaskSpec) -> LoadedModel:
    """Load ``name`` (alias, local path or hub id) with a classification/regression head.

    Decoders (Llama, GPT-2...) get their ``ForSequenceClassification`` class (last-token
    pooling), which needs a pad token: the EOS token is used when the tokenizer has none.
    Modules the checkpoint does not hold (the new head, sometimes a pooler) are returned in
    ``trained_modules`` so they train and are saved with the adapter: left frozen they would
    stay random and differ between the training run and a later reload.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if is_causal(task):  # prompt -> response tasks: the language-model head as it is
        return load_causal_lm(name)
    try:
        resolved = resolve_model(name)
    except FileNotFoundError as err:
        raise ModelLoadError(str(err)) from err
    kwargs = resolved.pretrained_kwargs()
    try:
        config = AutoConfig.from_pretrained(resolved.path, num_labels=task.num_labels, **kwargs)
        config.problem_type = "regression" if task.is_regression else "single_label_classification"
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kwargs)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolved.path,
            config=config,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError, KeyError) as err:
        raise _load_error("model", name, resolved.path, err) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {name!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model = _as_plain_model(model)
    return LoadedModel(model, tokenizer, resolved, _trained_modules(model, info))


def _load_error(what: str, name: str, path: str, err: Exception) -> ModelLoadError:
    """One line: what failed to load from where, the nearest alias, and what to pass."""
    where = "local folder" if os.path.exists(path) else "Hugging Face hub id"
    close = difflib.get_close_matches(name, MODEL_ALIASES, n=1)
    hint = f" Did you mean the alias {close[0]!r}?" if close else ""
    return ModelLoadError(
        f"could not load {what} {name!r} ({where} {path}): {str(err).rstrip('.')}.{hint}"
        f" Pass a built-in alias ({', '.join(MODEL_ALIASES)}), a folder written by"
        " save_pretrained, or a hub id reachable from this machine."
    )


def _as_plain_model(model: nn.Module) -> nn.Module:
    """Forget that weights came from a GGUF file: transformers dequantizes them to plain
    float tensors on load but keeps the GGUF "quantizer", which makes ``save_pretrained``
    (the merged export) refuse the model. What is left is an ordinary model."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_causal_lm(name: str) -> LoadedModel:
    """Load ``name`` with ``AutoModelForCausalLM`` (its own LM head) and its tokenizer.

    Nothing trains in full (``trained_modules`` holds only modules the checkpoint lacked,
    never a tied LM head). A tokenizer without a pad token pads with its EOS token; the
    generation config gets the pad and EOS ids so greedy decoding stops at EOS.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        resolved = resolve_model(name)
    except FileNotFoundError as err:
        raise ModelLoadError(str(err)) from err
    kwargs = resolved.pretrained_kwargs()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kwargs)
        model, info = AutoModelForCausalLM.from_pretrained(
            resolved.path, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError, KeyError) as err:
        raise _load_error("causal LM", name, resolved.path, err) from err
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            f"tokenizer of {name!r} has no EOS token: a response could not be ended"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config.eos_token_id is None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    model = _as_plain_model(model)
    trained = _trained_modules(model, info)
    if getattr(model.config, "tie_word_embeddings", False):
        trained = [n for n in trained if n != "lm_head"]
    return LoadedModel(model, tokenizer, resolved, trained)


def max_tokens(loaded: LoadedModel, requested: int) -> int:
    """``requested``, lowered to what the model's position embeddings and tokenizer allow."""
    limits = [
        requested,
        getattr(loaded.model.config, "max_position_embeddings", None) or requested,
        getattr(loaded.tokenizer, "model_max_length", None) or requested,
    ]
    allowed = min(limits)
    if allowed < requested:
        logger.info("max_length %d exceeds what the model takes: using %d", requested, allowed)
    return allowed


def _trained_modules(model: nn.Module, info: dict[str, Any]) -> list[str]:
    params = dict(model.named_parameters())
    names = [n for n, _ in model.named_children() if n in HEAD_MODULES]
    for key in sorted(set(info.get("missing_keys", ())) | _mismatched(info)):
        if key in params:
            module = key.rpartition(".")[0]
            if not any(module == n or module.startswith(n + ".") for n in names):
                names.append(module)
    return names


def _mismatched(info: dict[str, Any]) -> set[str]:
    # Entries are (key, checkpoint shape, model shape) tuples or plain keys by version.
    return {m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", ())}


def method_config(
    spec: MethodSpec, model: nn.Module, trained: list[str], seed: int
) -> AdapterConfig:
    """The method's config for this model: spec fields, the head, the seed, the budget.

    ``spec.target_rank`` is an average rank: a method whose config has a ``target_rank``
    field takes it as is (IncreLoRA, AdaLoRA: the papers' budget); other methods are sized to
    the trainable-parameter count of LoRA at that rank with
    :func:`increlora.budget.match_budget`; methods without a size (full fine-tuning) ignore
    it. A budget in the method's own fields (``target_params``) takes precedence; with
    ``spec.budget == "params"`` a method with a ``target_params`` field gets LoRA's count.
    """
    cls = get_method(spec.name)
    config_cls = cls.config_class
    fields = {f.name for f in dataclasses.fields(config_cls)}
    args = dict(spec.args)
    # Full fine-tuning trains every module anyway (its config refuses modules_to_save).
    if "modules_to_save" not in args and not issubclass(config_cls, FullConfig):
        args["modules_to_save"] = list(trained)
    if "seed" in fields and "seed" not in args:
        args["seed"] = seed
    target_rank = spec.target_rank
    if args.get("target_params") is not None:
        args["target_rank"] = None
        target_rank = None
    if target_rank is None:
        return config_cls.from_dict(args)
    if spec.budget == "params" and "target_params" in fields:
        from ..budget import lora_equivalent_parameters

        probe = config_cls.from_dict({**args, "target_rank": target_rank})
        params = lora_equivalent_parameters(model, probe, target_rank)
        return config_cls.from_dict({**args, "target_rank": None, "target_params": params})
    if "target_rank" in fields:
        return config_cls.from_dict({**args, "target_rank": target_rank})
    if getattr(cls, "size_field", None) is None:
        logger.info("method %s has no size: target_rank %s ignored", spec.name, target_rank)
        return config_cls.from_dict(args)
    from ..budget import match_budget  # only methods sized by parameter count need it

    return match_budget(
        spec.name, model, average_rank=target_rank, base_config=config_cls.from_dict(args)
    )


def adapt(spec: MethodSpec, loaded: LoadedModel, seed: int) -> AdaptedModel:
    """Inject the method into the loaded model (in place) and return the handle."""
    config = method_config(spec, loaded.model, loaded.trained_modules, seed)
    return inject(loaded.model, config, method=spec.name)
