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
    del meta["sha256"]  # as written before checksums were recorded
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
