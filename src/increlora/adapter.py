"""Putting a method on a model, and everything done with the result afterwards.

    adapted = increlora.inject(model, IncreLoRAConfig(target_rank=2))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-3)
    controller = adapted.controller(optimizer, total_steps=1000)

The model is modified in place (so a user keeps their model object, and DDP / accelerate can
wrap it as usual); :class:`AdaptedModel` is a handle to the adapter layers in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import methods as _methods  # noqa: F401  (fills the registry)
from .adapter_format import ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, CONFIG_FILE, WEIGHTS_FILE
from .config import AdapterConfig, ConfigError
from .injection import find_modules_to_save, find_targets, replace_module
from .io import (
    AdapterFileError,
    add_manifest,
    atomic_directory,
    atomic_write_json,
    check_finite,
    file_sha256,
    load_tensors,
    read_json,
    save_tensors,
    verify_adapter_manifest,
    verify_file_checksums,
)
from .layers.base import AdapterLayer
from .methods.base import Controller, Method, ModelHandle, get_method, method_for_config


class AdaptedModel(ModelHandle):
    """Handle to the adapter layers a method put into a model."""

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        layers: dict[str, AdapterLayer],
        saved_modules: list[str],
    ) -> None:
        self.model = model
        self.method = method
        self.layers = layers
        self.saved_modules = saved_modules
        self._controller: Controller | None = None

    def _make_controller(self, optimizer: Any, total_steps: int) -> Controller:
        return self.method.make_controller(self.layers, optimizer, total_steps)

    def rank_pattern(self) -> dict[str, int]:
        """Rank per adapted module (the rank of the exported LoRA factors)."""
        pattern = {}
        for name, layer in self.layers.items():
            factors = layer.lora_factors()
            if factors is not None:
                pattern[name] = int(factors[0].shape[0])
        return pattern

    def num_adapter_parameters(self) -> int:
        return sum(layer.num_adapter_parameters() for layer in self.layers.values())

    def num_trainable_parameters(self) -> int:
        """Real trainable count: active adapter parameters + modules_to_save."""
        saved = sum(
            p.numel() for n in self.saved_modules for p in self.model.get_submodule(n).parameters()
        )
        return self.num_adapter_parameters() + saved

    # ------------------------------------------------------------------ inference
    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Temporarily run the base model alone."""
        previous = {name: layer.disabled for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.disabled = True
        try:
            yield
        finally:
            for name, layer in self.layers.items():
                layer.disabled = previous[name]

    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold every update into its base weight and put the plain base layers back."""
        for name, layer in self.layers.items():
            layer.merge()
            replace_module(self.model, name, layer.base_layer)
        self.layers = {}
        return self.model

    # ------------------------------------------------------------------- saving
    def save(self, path: str | Path) -> None:
        """Adapter-only save: ``increlora_config.json`` + ``adapter.safetensors`` (atomic).

        The JSON records each module's shape and ranks, the sha256 of the weight file, and a
        manifest: one sha256 over all of it (with a fingerprint per field), so that an edited
        alpha, rank, target module or shape is refused by :func:`load_adapter`, naming it.
        """
        tensors: dict[str, torch.Tensor] = {}
        ranks = {}
        for name, layer in self.layers.items():
            for key, t in layer.adapter_state().items():
                tensors[f"{name}.{key}"] = t
            ranks[name] = layer.rank_state()
        for name in self.saved_modules:
            for key, t in self.model.get_submodule(name).state_dict().items():
                tensors[f"{name}.{key}"] = t
        meta = {
            "format": ADAPTER_FORMAT,
            "format_version": ADAPTER_FORMAT_VERSION,
            "method": self.method.name,
            "config": self.config.to_dict(),
            "modules": {
                name: {"shape": [layer.out_features, layer.in_features], "ranks": ranks[name]}
                for name, layer in self.layers.items()
            },
            "modules_to_save": self.saved_modules,
        }
        with atomic_directory(path) as tmp:
            save_tensors(tmp / WEIGHTS_FILE, tensors)
            meta["sha256"] = {WEIGHTS_FILE: file_sha256(tmp / WEIGHTS_FILE)}
            atomic_write_json(tmp / CONFIG_FILE, add_manifest(meta))

    def export_peft(self, path: str | Path, **kwargs: Any) -> None:
        """Write a PEFT LoRA adapter directory (see :func:`increlora.export.export_peft`)."""
        from .export import export_peft

        export_peft(self, path, **kwargs)


def _attach(
    model: nn.Module, method: Method, before_attach=None
) -> tuple[dict[str, AdapterLayer], list[str]]:
    """Build every layer first, then swap them in: a failure leaves ``model`` unchanged."""
    config = method.config
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ConfigError("model already holds adapter layers; inject into a fresh model")
    names = find_targets(model, config)
    save_names = find_modules_to_save(model, config.modules_to_save)
    overlap = [n for n in names if any(n == s or n.startswith(s + ".") for s in save_names)]
    if overlap:
        raise ConfigError(f"modules_to_save and target_modules overlap at {overlap}")
    grad_state = {p: p.requires_grad for p in model.parameters()}
    try:
        layers = method.build_layers(model, names)
        if before_attach is not None:
            before_attach(layers, save_names)
    except BaseException:
        for p, flag in grad_state.items():
            p.requires_grad_(flag)
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        replace_module(model, name, layer)
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    for name in save_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return layers, save_names


def inject(model: nn.Module, config: AdapterConfig, method: str | None = None) -> AdaptedModel:
    """Put the method of ``config`` (or the named ``method``) on ``model``, in place."""
    cls = get_method(method) if method is not None else method_for_config(config)
    instance = cls(config)
    if hasattr(instance, "inject_model"):  # methods without adapter layers (full, peft-*)
        return instance.inject_model(model)
    layers, save_names = _attach(model, instance)
    return AdaptedModel(model, instance, layers, save_names)


def _names(names: Any, limit: int = 5) -> str:
    """A sorted, shortened list of names for an error message."""
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (", ".join(names[:limit]) or "none") + more


def load_adapter(model: nn.Module, path: str | Path) -> AdaptedModel:
    """Rebuild a saved adapter on ``model`` with the exact saved shapes and ranks.

    Every file and shape is checked before the model is touched; a corrupt, modified or
    foreign file (the weight file's sha256 recorded at save time is verified; adapters saved
    before checksums were recorded load without that check), a JSON field changed since it was
    saved (its manifest; adapters saved before manifests load with a warning), a non-finite
    weight, a recorded shape that differs
    from the model's module, a tensor that belongs to no module of the model, or a model
    whose shapes differ raises AdapterFileError naming the file and the problem.
    """
    path = Path(path)
    config_file = path / CONFIG_FILE
    meta = read_json(config_file)
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise AdapterFileError(
            f"{config_file}: not an increlora adapter (no format={ADAPTER_FORMAT!r}); for a PEFT"
            " adapter use peft.PeftModel.from_pretrained"
        )
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterFileError(
            f"{config_file}: format_version must be an integer, got {version!r}; the file was"
            " edited or not written by increlora"
        )
    if version > ADAPTER_FORMAT_VERSION:
        raise AdapterFileError(f"{config_file}: written by a newer increlora; upgrade to load it")
    verify_adapter_manifest(meta, config_file)
    try:
        cls = get_method(meta["method"])
        config = cls.config_class.from_dict(meta["config"])
        modules = meta["modules"]
    except (KeyError, TypeError, ConfigError) as err:
        raise AdapterFileError(f"{config_file}: malformed adapter config ({err})") from err
    if not isinstance(modules, dict) or not all(isinstance(m, dict) for m in modules.values()):
        raise AdapterFileError(f"{config_file}: malformed adapter config ('modules')")
    incomplete = [name for name, entry in modules.items() if "ranks" not in entry]
    if incomplete:
        raise AdapterFileError(
            f"{config_file}: module(s) {_names(incomplete)} have no 'ranks'; the file was"
            " edited or truncated: save the adapter again"
        )
    tensors = load_tensors(path / WEIGHTS_FILE)
    verify_file_checksums(path, meta.get("sha256"), config_file)
    check_finite(tensors, path / WEIGHTS_FILE)
    instance = cls(config)
    if hasattr(instance, "load_model"):  # methods without adapter layers restore themselves
        return instance.load_model(model, tensors, path / WEIGHTS_FILE)

    def check(layers: dict[str, AdapterLayer], save_names: list[str]) -> None:
        if set(layers) != set(modules):
            raise AdapterFileError(
                f"{config_file}: adapter was saved for modules that do not match this model"
                f" (not in this model: {_names(set(modules) - set(layers))}; in this model"
                f" but not in the adapter: {_names(set(layers) - set(modules))})"
            )
        owners = [*layers, *save_names]
        stray = [k for k in tensors if not any(k.startswith(n + ".") for n in owners)]
        if stray:
            raise AdapterFileError(
                f"{path / WEIGHTS_FILE}: {len(stray)} tensor(s) belong to no adapted or saved"
                f" module of this model: {_names(stray)}"
            )
        for name, layer in layers.items():
            own = {k[len(name) + 1 :]: t for k, t in tensors.items() if k.startswith(name + ".")}
            try:
                layer.check_adapter_state(own, modules[name]["ranks"])
            except ValueError as err:
                raise AdapterFileError(f"{path / WEIGHTS_FILE}: module {name}: {err}") from err
            shape = modules[name].get("shape")
            if shape is not None and shape != [layer.out_features, layer.in_features]:
                raise AdapterFileError(
                    f"{config_file}: module {name} is recorded with shape {shape}, but this"
                    f" model's module is [{layer.out_features}, {layer.in_features}] (out, in):"
                    " the adapter belongs to another model, or its JSON was edited"
                )
            layer.load_adapter_state(own, modules[name]["ranks"])
        for name in save_names:
            module = model.get_submodule(name)
            for key, t in module.state_dict().items():
                saved = tensors.get(f"{name}.{key}")
                if saved is None or saved.shape != t.shape:
                    raise AdapterFileError(
                        f"{path / WEIGHTS_FILE}: {name}.{key} is missing or has another shape"
                        f" ({None if saved is None else tuple(saved.shape)} vs {tuple(t.shape)})"
                    )
        with torch.no_grad():
            for name in save_names:
                for key, t in model.get_submodule(name).state_dict().items():
                    t.copy_(tensors[f"{name}.{key}"])

    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        _attach(model, instance)  # the ConfigError that says to use a fresh model
    try:
        layers, save_names = _attach(model, instance, before_attach=check)
    except AdapterFileError:
        raise
    except (TypeError, ValueError, KeyError, OverflowError, RuntimeError) as err:
        # A config that passed its own checks but cannot build layers on this model (an
        # edited target_modules of the wrong type, a rank too large for a tensor).
        message = " ".join(str(err).split())[:300]
        raise AdapterFileError(
            f"{config_file}: the recorded config does not build on this model ({message});"
            " the file was edited or belongs to another model: save the adapter again"
        ) from err
    return AdaptedModel(model, instance, layers, save_names)
