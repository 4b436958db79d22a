"""Saved adapters are verified on load (issue 11, item 2): checksums of the weight files,
recorded shapes, adapter keys that land on no module, and PEFT load failures, each a one-line
error naming the file. Tiny models built from configs; nothing is downloaded."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import MODEL_CASES, tiny_bert

import increlora
from increlora import cli
from increlora.io import (
    DATA_SHA256_KEY,
    AdapterFileError,
    file_sha256,
    safetensors_data_sha256,
    safetensors_metadata,
)
from increlora.layers.base import AdapterLayer
from increlora.methods.lora import LoRAConfig

GLUE = Path(__file__).parent / "fixtures" / "glue"
BERT = MODEL_CASES["bert"]


def bert(layers: int = 2, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def adapted(model: torch.nn.Module) -> increlora.AdaptedModel:
    handle = increlora.inject(
        model, LoRAConfig(r=2, target_modules=BERT.targets, modules_to_save=["classifier"])
    )
    with torch.no_grad():  # B starts at zero: make the update non-trivial
        for layer in handle.layers.values():
            for p in layer.adapter_parameters():
                p.normal_(0, 0.5)
    return handle


def overwrite_middle(path: Path, data: bytes = b"\x00\x00\x80\x3f") -> None:
    """Overwrite 4 bytes in the middle of a safetensors file's tensor data (stays readable)."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    middle = start + ((len(raw) - start) // 2) // 4 * 4
    assert raw[middle : middle + 4] != data
    raw[middle : middle + 4] = data
    path.write_bytes(bytes(raw))


def no_adapter_layers(model: torch.nn.Module) -> bool:
    return not any(isinstance(m, AdapterLayer) for m in model.modules())


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------- increlora's own format
def test_save_records_the_weight_checksum_and_load_refuses_changed_bytes(tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    adapted(bert()).save(path)
    meta = json.loads((path / "increlora_config.json").read_text())
    assert meta["sha256"] == {"adapter.safetensors": file_sha256(path / "adapter.safetensors")}
    assert increlora.load_adapter(bert(seed=1), path).layers  # intact: loads

    overwrite_middle(path / "adapter.safetensors")
    fresh = bert(seed=1)
    with pytest.raises(AdapterFileError) as err:
        increlora.load_adapter(fresh, path)
    message = one_line(err)
    assert str(path / "adapter.safetensors") in message
    assert "corrupted or was modified" in message and "save or export the adapter again" in message
    assert no_adapter_layers(fresh), "the model is left unchanged"


def test_adapters_saved_without_checksums_still_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "adapter"
    model = bert()
    adapted(model).save(path)
    meta_file = path / "increlora_config.json"
    meta = json.loads(meta_file.read_text())
    del meta["sha256"], meta["manifest"]  # as written before checksums were recorded
    meta_file.write_text(json.dumps(meta))
    fresh = bert()
    with caplog.at_level(logging.DEBUG, logger="increlora.io"):
        increlora.load_adapter(fresh, path)
    assert "records no checksums" in caplog.text
    inputs = BERT.inputs()
    torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_full_fine_tuning_save_is_verified_too(tmp_path: Path) -> None:
    model = MODEL_CASES["mlp"].make()
    increlora.inject(model, increlora.get_method("full").config_class()).save(tmp_path / "full")
    overwrite_middle(tmp_path / "full" / "adapter.safetensors")
    with pytest.raises(AdapterFileError, match="adapter.safetensors: sha256 differs"):
        increlora.load_adapter(MODEL_CASES["mlp"].make(), tmp_path / "full")


def test_an_edited_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    adapted(bert()).save(path)
    meta_file = path / "increlora_config.json"
    meta = json.loads(meta_file.read_text())
    name = next(iter(meta["modules"]))
    meta["modules"][name]["shape"] = [16, 8]
    del meta["manifest"]  # as saved before manifests: the shape check itself still refuses
    meta_file.write_text(json.dumps(meta))
    fresh = bert()
    with pytest.raises(AdapterFileError) as err:
        increlora.load_adapter(fresh, path)
    message = one_line(err)
    assert "increlora_config.json" in message and name in message
    assert "[16, 8]" in message and "[16, 16]" in message
    assert no_adapter_layers(fresh)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda meta: meta.update(format_version="1"), "format_version must be an integer"),
        (lambda meta: next(iter(meta["modules"].values())).pop("ranks"), "have no 'ranks'"),
    ],
)
def test_edited_adapter_json_is_a_one_line_error(tmp_path: Path, edit, expected) -> None:
    path = tmp_path / "adapter"
    adapted(bert()).save(path)
    meta_file = path / "increlora_config.json"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    del meta["manifest"]  # as saved before manifests: the structure checks still refuse
    meta_file.write_text(json.dumps(meta))
    fresh = bert()
    with pytest.raises(AdapterFileError) as err:
        increlora.load_adapter(fresh, path)
    assert expected in one_line(err) and "increlora_config.json" in one_line(err)
    assert no_adapter_layers(fresh)


def test_keys_that_land_on_no_module_are_named(tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    adapted(bert(layers=3)).save(path)
    shallow = bert(layers=2)
    with pytest.raises(AdapterFileError) as err:
        increlora.load_adapter(shallow, path)
    message = one_line(err)
    assert "not in this model: bert.encoder.layer.2." in message
    assert no_adapter_layers(shallow)

    # A tensor of a module nobody adapted (the JSON lists only real ones): named, refused.
    from safetensors.torch import load_file, save_file

    path = tmp_path / "extra"
    adapted(bert()).save(path)
    weights = path / "adapter.safetensors"
    tensors = load_file(weights)
    tensors["bert.encoder.layer.7.attention.self.query.lora_A"] = torch.zeros(2, 16)
    save_file(tensors, weights)
    meta_file = path / "increlora_config.json"
    meta = json.loads(meta_file.read_text())
    meta["sha256"]["adapter.safetensors"] = file_sha256(weights)
    del meta["manifest"]  # as saved before manifests
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match=r"1 tensor\(s\) belong to no .*\.layer\.7\."):
        increlora.load_adapter(bert(), path)


# ------------------------------------------------------------------------- PEFT adapters
needs_peft = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None, reason="PEFT adapters need the peft extra"
)


@needs_peft
def test_peft_export_carries_its_data_checksum(tmp_path: Path) -> None:
    from increlora.methods.peft_reference import load_peft_adapter

    model = bert()
    adapted(model).export_peft(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    assert safetensors_metadata(weights)[DATA_SHA256_KEY] == safetensors_data_sha256(weights)
    inputs = BERT.inputs()
    reloaded = load_peft_adapter(bert(), tmp_path / "peft").eval()
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)

    overwrite_middle(weights)
    with pytest.raises(AdapterFileError) as err:
        load_peft_adapter(bert(), tmp_path / "peft")
    message = one_line(err)
    assert str(weights) in message and "corrupted or was modified" in message


@needs_peft
def test_peft_adapter_of_a_deeper_model_is_refused(tmp_path: Path) -> None:
    from increlora.methods.peft_reference import load_peft_adapter

    adapted(bert(layers=3)).export_peft(tmp_path / "peft")
    shallow = bert(layers=2)
    with pytest.raises(AdapterFileError) as err:
        load_peft_adapter(shallow, tmp_path / "peft")
    message = one_line(err)
    assert "adapter_model.safetensors" in message and "land on no module" in message
    assert "bert.encoder.layer.2.attention.self.query.lora_A.weight" in message
    assert not any("lora" in n for n, _ in shallow.named_parameters()), "model untouched"


@needs_peft
def test_peft_adapter_of_a_shallower_model_is_refused(tmp_path: Path) -> None:
    """The reverse: a 2-layer adapter on a 3-layer model loaded with layer 2 unadapted."""
    from increlora.methods.peft_reference import load_peft_adapter

    adapted(bert(layers=2)).export_peft(tmp_path / "peft")
    deeper = bert(layers=3)
    with pytest.raises(AdapterFileError) as err:
        load_peft_adapter(deeper, tmp_path / "peft")
    message = one_line(err)
    assert "unadapted" in message and "bert.encoder.layer.2.attention.self.query" in message
    assert not any("lora" in n for n, _ in deeper.named_parameters()), "model untouched"


@needs_peft
def test_pickle_peft_weights_are_refused_in_one_line(tmp_path: Path) -> None:
    from increlora.methods.peft_reference import load_peft_adapter

    adapted(bert()).export_peft(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    weights.rename(tmp_path / "peft" / "adapter_model.bin")  # stands in for a pickle file
    with pytest.raises(AdapterFileError) as err:
        load_peft_adapter(bert(), tmp_path / "peft")
    assert "a pickle file, which increlora never loads" in one_line(err)


def _peft_saved(path: Path) -> Path:
    """An adapter written by PEFT itself (no increlora checksum in it)."""
    model = increlora.inject(
        tiny_bert(), increlora.get_method("peft-lora").config_class(r=2, target_modules=["query"])
    )
    model.save(path)
    return path


@needs_peft
def test_broken_peft_files_are_one_line_errors(tmp_path: Path) -> None:
    from increlora.methods.peft_reference import load_peft_adapter

    path = _peft_saved(tmp_path / "peft")
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    assert DATA_SHA256_KEY not in safetensors_metadata(weights)
    load_peft_adapter(tiny_bert(), path)  # intact, written by PEFT: loads

    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(AdapterFileError) as err:
        load_peft_adapter(tiny_bert(), path)
    assert str(weights) in one_line(err)
    weights.write_bytes(good)

    text = config.read_text()
    config.write_text(text[: len(text) // 2])  # invalid JSON
    with pytest.raises(AdapterFileError) as err:
        load_peft_adapter(tiny_bert(), path)
    assert str(config) in one_line(err) and "not valid JSON" in str(err.value)
    config.write_text('{"peft_type": "NO_SUCH_TYPE"}')
    with pytest.raises(AdapterFileError) as err:
        load_peft_adapter(tiny_bert(), path)
    assert str(config) in one_line(err)
    config.write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match="not a PEFT adapter config"):
        load_peft_adapter(tiny_bert(), path)


# ------------------------------------------------------------ the CLI: one line, exit code 2
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    words = "the a is of and to it film movie good bad great not very story fun boring".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(out)
    return out


@needs_peft
def test_cli_refuses_a_corrupted_adapter_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    from increlora.runner.model import load_model
    from increlora.tasks import get_task

    own, converted = tmp_path / "increlora_adapter", tmp_path / "adapter"
    handle = adapted(load_model(str(tiny_model_dir), get_task("sst2")).model)
    handle.save(own)
    handle.export_peft(converted)
    overwrite_middle(own / "adapter.safetensors")
    overwrite_middle(converted / "adapter_model.safetensors")
    common = ["--model", str(tiny_model_dir), "--task", "sst2"]
    data = ["--data-dir", str(GLUE), "--max-length", "32"]
    commands = [
        (["evaluate", "--adapter", str(own), *common, *data], own / "adapter.safetensors"),
        (["evaluate", "--adapter", str(converted), *common, *data], converted),
        (["export", "--adapter", str(own), *common, "--output", str(tmp_path / "m")], own),
        (["export", "--adapter", str(converted), *common, "--output", str(tmp_path / "n")], None),
    ]
    for argv, named in commands:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert "corrupted or was modified" in err and str(named or converted) in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "n").exists()


# -------------------------------------------- the manifest: weights and meaning, one checksum
def increlora_adapted(model: torch.nn.Module) -> increlora.AdaptedModel:
    """IncreLoRA at rank 1 with every factor non-trivial, so rank and alpha edits show."""
    handle = increlora.inject(
        model,
        increlora.IncreLoRAConfig(
            target_rank=2, target_modules=BERT.targets, modules_to_save=["classifier"]
        ),
    )
    with torch.no_grad():
        for layer in handle.layers.values():
            for p in layer.adapter_parameters():
                p.normal_(0, 0.5)
            layer.lora_E[layer.active_rank :] = 0.0  # the reserve's e stays 0 until it grows
    return handle


@pytest.fixture
def warnings_seen(caplog: pytest.LogCaptureFixture, monkeypatch):
    """A function giving the increlora warnings logged so far in the test (the CLI, run
    earlier in this session, stops the package's logger from propagating to pytest)."""
    monkeypatch.setattr(logging.getLogger("increlora"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="increlora")
    return lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**BERT.inputs()).logits


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=2))


def _first_module(meta: dict) -> dict:
    return meta["modules"][sorted(meta["modules"])[0]]


@pytest.mark.parametrize(
    ("edit", "fields"),
    [
        (lambda m: m["config"].update(alpha=160.0), ["config.alpha"]),
        (lambda m: _first_module(m)["ranks"].update(active_rank=2), ["ranks.active_rank"]),
        (lambda m: m["config"].update(scaling="constant"), ["config.scaling"]),
        (lambda m: m["config"].update(target_modules=["query"]), ["config.target_modules"]),
        (lambda m: _first_module(m).update(shape=[16, 8]), ["].shape"]),
        (lambda m: m.update(method="lora"), ["method"]),
        (
            lambda m: m["config"].update(alpha=32.0, target_rank=4),
            ["config.alpha", "config.target_rank"],
        ),
    ],
)
def test_package_adapter_refuses_edits_that_change_its_meaning(
    tmp_path: Path, edit, fields
) -> None:
    """Issue 23, item 3: alpha 16 -> 160 or active_rank 1 -> 2 loaded silently and changed the
    logits. Each edit is now one line naming the file and the edited field(s)."""
    path = tmp_path / "adapter"
    model = bert()
    increlora_adapted(model).save(path)
    meta_file = path / "increlora_config.json"
    assert json.loads(meta_file.read_text())["config"]["alpha"] == 16.0
    assert _first_module(json.loads(meta_file.read_text()))["ranks"]["active_rank"] == 1
    intact = bert()  # the same base model: the saved adapter gives back the same logits
    increlora.load_adapter(intact, path)
    torch.testing.assert_close(_logits(intact), _logits(model), rtol=0, atol=0)

    _edit_json(meta_file, edit)
    fresh = bert(seed=1)
    with pytest.raises(AdapterFileError) as err:
        increlora.load_adapter(fresh, path)
    message = one_line(err)
    assert message.startswith(f"{meta_file}: ")
    for name in fields:
        assert name in message, (name, message)
    assert "restore the file or save the adapter again" in message
    assert no_adapter_layers(fresh), "the model is left unchanged"


def test_the_manifest_is_one_sha256_over_weights_and_config(tmp_path: Path) -> None:
    """An independent recomputation: sha256 of the canonical JSON of everything recorded but
    the manifest itself (the weight file's own sha256 included, so the weights are covered)."""
    import hashlib

    path = tmp_path / "adapter"
    increlora_adapted(bert()).save(path)
    meta = json.loads((path / "increlora_config.json").read_text())
    manifest = meta.pop("manifest")
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    assert manifest["sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert meta["sha256"]["adapter.safetensors"] == file_sha256(path / "adapter.safetensors")
    assert "config.alpha" in manifest["fields"] and "method" in manifest["fields"]


def test_a_package_adapter_saved_before_the_manifest_loads_with_one_warning(
    tmp_path: Path, warnings_seen
) -> None:
    path = tmp_path / "adapter"
    model = bert()
    increlora_adapted(model).save(path)
    _edit_json(path / "increlora_config.json", lambda m: m.pop("manifest"))
    fresh = bert()
    increlora.load_adapter(fresh, path)
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=0, atol=0)
    warnings = warnings_seen()
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "no manifest" in warnings[0] and "increlora_config.json" in warnings[0]


def test_non_finite_package_weights_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    handle = adapted(bert())
    name = sorted(handle.layers)[3]
    with torch.no_grad():
        handle.layers[name].lora_B[0, 0] = float("inf")
    handle.save(path)  # saved as it was: the checksums agree, the values do not
    fresh = bert()
    with pytest.raises(AdapterFileError) as err:
        increlora.load_adapter(fresh, path)
    message = one_line(err)
    assert str(path / "adapter.safetensors") in message
    assert f"{name}.lora_B" in message and "inf" in message
    assert no_adapter_layers(fresh)


@needs_peft
@pytest.mark.parametrize(
    ("edit", "fields"),
    [
        (lambda c: c.update(lora_alpha=c["lora_alpha"] * 100), ["lora_alpha"]),
        (lambda c: c.update(r=4), ["r"]),
        (lambda c: c.update(rank_pattern={c["target_modules"][0]: 1}), ["rank_pattern"]),
        (lambda c: c.update(target_modules=c["target_modules"][:3]), ["target_modules"]),
        (lambda c: c.update(use_rslora=True), ["use_rslora"]),
        (lambda c: c.update(modules_to_save=None), ["modules_to_save"]),
    ],
)
def test_peft_export_refuses_config_edits_that_change_its_meaning(
    tmp_path: Path, edit, fields
) -> None:
    """Issue 23, item 3: lora_alpha x 100 in adapter_config.json loaded silently. The manifest
    sits in the safetensors header (plain PEFT ignores it); increlora's loader checks it."""
    from increlora.methods.peft_reference import load_peft_adapter

    model = bert()
    adapted(model).export_peft(tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    _edit_json(config_file, edit)
    fresh = bert()
    with pytest.raises(AdapterFileError) as err:
        load_peft_adapter(fresh, tmp_path / "peft")
    message = one_line(err)
    assert message.startswith(f"{config_file}: ")
    for name in fields:
        assert name in message, (name, message)
    assert "restore the file or export the adapter again" in message
    assert not any("lora" in n for n, _ in fresh.named_parameters()), "model untouched"


@needs_peft
def test_peft_export_still_loads_in_plain_peft_and_harmless_edits_pass(tmp_path: Path) -> None:
    from peft import PeftModel

    from increlora.methods.peft_reference import load_peft_adapter

    model = bert()
    adapted(model).export_peft(tmp_path / "peft")
    plain = PeftModel.from_pretrained(bert(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(plain), _logits(model))
    # Where the base model lives does not change what the weights mean.
    _edit_json(
        tmp_path / "peft" / "adapter_config.json",
        lambda c: c.update(base_model_name_or_path="/elsewhere/minilm"),
    )
    torch.testing.assert_close(
        _logits(load_peft_adapter(bert(), tmp_path / "peft")), _logits(model)
    )


@needs_peft
def test_peft_export_manifest_covers_the_tensor_index(tmp_path: Path) -> None:
    """Swapping two tensors' names in the header leaves the data sha256 intact: the manifest
    covers names, shapes and offsets too."""
    from increlora.methods.peft_reference import load_peft_adapter

    adapted(bert()).export_peft(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    raw = weights.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    a, b = (
        k
        for k in sorted(header)
        if k.endswith("layer.0.attention.self.query.lora_B.weight")
        or k.endswith("layer.0.attention.self.key.lora_B.weight")
    )
    header[a], header[b] = header[b], header[a]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
    with pytest.raises(AdapterFileError) as err:
        load_peft_adapter(bert(), tmp_path / "peft")
    message = one_line(err)
    assert str(weights) in message and "tensors" in message


@needs_peft
def test_peft_export_without_a_manifest_loads_with_one_warning(
    tmp_path: Path, warnings_seen
) -> None:
    from safetensors.torch import load_file, save_file

    from increlora.io import MANIFEST_SHA256_KEY
    from increlora.methods.peft_reference import load_peft_adapter

    model = bert()
    adapted(model).export_peft(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    metadata = safetensors_metadata(weights)
    assert MANIFEST_SHA256_KEY in metadata
    old = {k: v for k, v in metadata.items() if k in ("format", DATA_SHA256_KEY)}
    save_file(load_file(weights), weights, metadata=old)  # as an export before the manifest
    assert safetensors_data_sha256(weights) == old[DATA_SHA256_KEY]
    reloaded = load_peft_adapter(bert(), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(model))
    warnings = warnings_seen()
    assert len(warnings) == 1 and "no manifest" in warnings[0] and str(weights) in warnings[0]


@needs_peft
def test_non_finite_peft_weights_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    from increlora.methods.peft_reference import load_peft_adapter

    handle = adapted(bert())
    name = sorted(handle.layers)[2]
    with torch.no_grad():
        handle.layers[name].lora_A[1, 3] = float("nan")
    handle.export_peft(tmp_path / "peft")
    fresh = bert()
    with pytest.raises(AdapterFileError) as err:
        load_peft_adapter(fresh, tmp_path / "peft")
    message = one_line(err)
    assert "adapter_model.safetensors" in message and f"{name}.lora_A.weight" in message
    assert "nan" in message
    assert not any("lora" in n for n, _ in fresh.named_parameters())
    # Written by PEFT itself (no increlora header at all): refused just the same.
    path = _peft_saved(tmp_path / "by_peft")
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("-inf")
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match=rf"{key}.*-inf"):
        load_peft_adapter(tiny_bert(), path)


@needs_peft
def test_both_formats_are_byte_identical_when_written_twice(tmp_path: Path) -> None:
    handle = increlora_adapted(bert())
    for name in ("a", "b"):
        handle.save(tmp_path / name / "own")
        handle.export_peft(tmp_path / name / "peft")
    for sub in (
        "own/adapter.safetensors",
        "own/increlora_config.json",
        "peft/adapter_model.safetensors",
        "peft/adapter_config.json",
    ):
        assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes(), sub


@needs_peft
def test_cli_evaluate_refuses_edited_adapters_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    from increlora.runner.model import load_model
    from increlora.tasks import get_task

    own, converted = tmp_path / "increlora_adapter", tmp_path / "adapter"
    handle = increlora_adapted(load_model(str(tiny_model_dir), get_task("sst2")).model)
    handle.save(own)
    handle.export_peft(converted)
    _edit_json(own / "increlora_config.json", lambda m: m["config"].update(alpha=160.0))
    _edit_json(
        converted / "adapter_config.json", lambda c: c.update(lora_alpha=c["lora_alpha"] * 100)
    )
    common = ["--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(GLUE)]
    for adapter, named, field in (
        (own, own / "increlora_config.json", "config.alpha"),
        (converted, converted / "adapter_config.json", "lora_alpha"),
    ):
        capsys.readouterr()
        assert cli.main(["evaluate", "--adapter", str(adapter), *common, "--max-length", "32"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert str(named) in err and field in err
