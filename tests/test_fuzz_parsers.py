"""Fuzzing the input parsers (issue 23): GLUE TSV files, JSON-lines task files, the YAML run
config and the package-format adapter JSON. Any input (random bytes, random text, values of
the wrong type, NaN, huge numbers, missing keys, nested lists) either parses or raises the
package's own error for that input, with a one-line message; never another exception.

Kept brief for CI (derandomized, so every run tries the same inputs): well under 30 s on one
core. Raise ``max_examples`` locally to search longer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import increlora
from increlora.config import ConfigError
from increlora.io import AdapterFileError
from increlora.methods.lora import LoRAConfig
from increlora.runner.config import RunConfig, read_yaml
from increlora.tasks import get_task
from increlora.tasks.causal_lm import CausalFormatError, read_jsonl
from increlora.tasks.glue import GlueFormatError, read_tsv
from increlora.tasks.offline import OfflineFormatError, jsonl_rows, text_field

FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ---------------------------------------------------------------------------- inputs
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [float("nan"), float("inf"), -1, 0, 10**30, 2**63, 1e308, 8.5, "1e39", "", "nan", [1]]
    ),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
raw_bytes = st.binary(max_size=300)
texts = st.text(max_size=300)


def one_line_error(err: BaseException) -> None:
    message = str(err)
    assert message and "\n" not in message and "\r" not in message, repr(message)


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


# ------------------------------------------------------------------------------- TSV
TSV_TASKS = ("sst2", "cola", "stsb", "mrpc")
tsv_cell = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["0", "1", "nan", "inf", "-inf", "1e400", "5.0", "x", "", '"', "\x00"]),
)
tsv_lines = st.lists(
    st.lists(tsv_cell, min_size=0, max_size=6).map("\t".join), min_size=0, max_size=6
).map("\n".join)


@FUZZ
@given(task=st.sampled_from(TSV_TASKS), data=st.one_of(raw_bytes, texts, tsv_lines))
def test_glue_tsv(tmp_path_factory, task: str, data: bytes | str) -> None:
    path = _write(tmp_path_factory.mktemp("tsv") / "train.tsv", data)
    try:
        examples = read_tsv(get_task(task), path)
    except GlueFormatError as err:
        one_line_error(err)
    else:
        assert examples


# ------------------------------------------------------------------------ JSON lines
def _jsonl(values: list) -> str:
    return "\n".join(json.dumps(v) for v in values)


records = st.one_of(
    json_values,
    st.fixed_dictionaries({"prompt": json_values, "response": json_values}),
    st.fixed_dictionaries({"messages": json_values}),
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["user", "assistant", "system", "bot", 1]),
                        "content": json_values,
                    }
                ),
                max_size=3,
            )
        }
    ),
)
jsonl_inputs = st.one_of(raw_bytes, texts, st.lists(records, max_size=4).map(_jsonl))


@FUZZ
@given(data=jsonl_inputs)
def test_prompt_response_jsonl(tmp_path_factory, data: bytes | str) -> None:
    path = _write(tmp_path_factory.mktemp("jsonl") / "train.jsonl", data)
    try:
        examples = read_jsonl(path)
    except CausalFormatError as err:
        one_line_error(err)
    else:
        assert examples and all(e.response.strip() for e in examples)


@FUZZ
@given(data=jsonl_inputs, field=st.sampled_from(["question", "prompt", "text"]))
def test_offline_jsonl(tmp_path_factory, data: bytes | str, field: str) -> None:
    path = _write(tmp_path_factory.mktemp("jsonl") / "dev.jsonl", data)
    try:
        for where, value in jsonl_rows(path):
            assert text_field(value, field, where).strip()
    except OfflineFormatError as err:
        one_line_error(err)


# -------------------------------------------------------------------- YAML run config
def _yaml(value) -> str:
    return yaml.safe_dump(value, allow_unicode=True)


sections = st.dictionaries(
    st.sampled_from(
        [
            "batch_size",
            "seed",
            "learning_rate",
            "max_steps",
            "epochs",
            "train_size",
            "max_length",
            "task",
            "eval_every",
            "report_to",
            "mixed_precision",
            "nonsense",
        ]
    ),
    json_values,
    max_size=4,
)
run_configs = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values,
        "preset": json_values,
        "output_dir": json_values,
        "data": st.one_of(sections, json_values),
        "train": st.one_of(sections, json_values),
        "method": st.one_of(
            st.dictionaries(
                st.sampled_from(["name", "target_rank", "args", "top_h", "init"]),
                json_values,
                max_size=3,
            ),
            json_values,
        ),
    },
)


@FUZZ
@given(data=st.one_of(raw_bytes, texts, run_configs.map(_yaml), json_values.map(_yaml)))
def test_yaml_run_config(tmp_path_factory, data: bytes | str) -> None:
    path = _write(tmp_path_factory.mktemp("yaml") / "run.yaml", data)
    try:
        RunConfig.from_dict(read_yaml(path))
    except ConfigError as err:
        one_line_error(err)


# ----------------------------------------------------------------- adapter JSON record
@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> tuple[Path, dict]:
    from conftest import MODEL_CASES

    path = tmp_path_factory.mktemp("adapter") / "increlora_adapter"
    increlora.inject(
        MODEL_CASES["mlp"].make(), LoRAConfig(r=2, target_modules=["lin0", "lin1"])
    ).save(path)
    return path, json.loads((path / "increlora_config.json").read_text())


def _mutate(meta: dict, where: list[str], value) -> dict:
    """``meta`` with the entry at ``where`` (a key path; missing keys are added) replaced."""
    meta = json.loads(json.dumps(meta))
    meta.pop("manifest")  # as an adapter from before manifests: every structure check runs
    node = meta
    for key in where[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if value is _DELETE:
        node.pop(where[-1], None)
    else:
        node[where[-1]] = value
    return meta


_DELETE = object()
ENTRIES = [
    ["format"],
    ["format_version"],
    ["method"],
    ["config"],
    ["config", "r"],
    ["config", "alpha"],
    ["config", "target_modules"],
    ["config", "dropout"],
    ["modules"],
    ["modules", "lin0"],
    ["modules", "lin0", "shape"],
    ["modules", "lin0", "ranks"],
    ["modules", "lin9"],
    ["modules_to_save"],
    ["sha256"],
    ["sha256", "adapter.safetensors"],
]


def _load(good: Path, tmp: Path, text: bytes | str) -> None:
    """Load the saved adapter with ``text`` as its JSON record: it loads or is refused."""
    from conftest import MODEL_CASES

    path = tmp / "increlora_adapter"
    path.mkdir()
    (path / "adapter.safetensors").write_bytes((good / "adapter.safetensors").read_bytes())
    _write(path / "increlora_config.json", text)
    try:
        handle = increlora.load_adapter(MODEL_CASES["mlp"].make(), path)
    except AdapterFileError as err:
        one_line_error(err)
    else:
        assert set(handle.layers) == {"lin0", "lin1"}  # what loads is the saved adapter


@FUZZ
@given(data=st.one_of(raw_bytes, texts, json_values.map(json.dumps)))
def test_adapter_json(saved_adapter, tmp_path_factory, data) -> None:
    _load(saved_adapter[0], tmp_path_factory.mktemp("adapter"), data)


@pytest.mark.parametrize("where", ENTRIES, ids=".".join)
@settings(FUZZ, max_examples=10)
@given(value=st.one_of(st.just(_DELETE), json_values))
def test_adapter_json_field(saved_adapter, tmp_path_factory, where: list[str], value) -> None:
    """One recorded field at a time replaced (or deleted), in a record without a manifest
    (as saved before manifests), so that every check after the manifest's runs too."""
    good, meta = saved_adapter
    _load(good, tmp_path_factory.mktemp("adapter"), json.dumps(_mutate(meta, where, value)))
