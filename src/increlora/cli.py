"""The ``increlora`` command: train, evaluate, export, bench, report.

``increlora train`` with no arguments runs the built-in default job (MiniLM on Rotten
Tomatoes with IncreLoRA at average rank 2). Configuration is the run's YAML file
(``--config``, default: the shipped ``default.yaml``) with command-line overrides on top;
the options are generated from the same dataclasses the Python API uses
(:mod:`increlora.runner.config`), so their help text is the fields' documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from .assets import AssetError
from .checkpoint import CheckpointWriteError
from .config import ConfigError
from .io import AdapterFileError, atomic_write_json
from .tasks import CausalFormatError, GlueFormatError, OfflineFormatError

# Errors caused by the user's input: reported as one line, exit code 2, no traceback.
_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointWriteError,
    ConfigError,
    GlueFormatError,
    OfflineFormatError,
    CausalFormatError,
    FileNotFoundError,
    AdapterFileError,
    AssetError,
)


# ----------------------------------------------------------- options from dataclasses
def _parser_for(hint: Any) -> tuple[Callable[[str], Any] | None, list[str] | None]:
    """(value parser, choices) for a field's type hint; "none"/"null" mean None if allowed."""
    if typing.get_origin(hint) is Literal:
        return None, [str(c) for c in typing.get_args(hint)]
    members = typing.get_args(hint)
    optional = type(None) in members
    kind = next((m for m in members if m is not type(None)), hint)

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
                ) from None
        return text

    return parse, None


def _add_field_options(
    parser: argparse.ArgumentParser,
    cls: type,
    section: str | None,
    defaults: dict[str, Any],
    skip: Sequence[str] = (),
    plain: dict[str, Any] | None = None,
) -> None:
    """One option per dataclass field; help = the field's help + its default(s).

    ``plain`` holds the dataclass defaults, ``defaults`` the default job's values; where they
    differ the help shows both (the default job's apply only to the default job).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        dest = f"{section}.{f.name}" if section else f.name
        flag = "--" + f.name.replace("_", "-")
        value = defaults.get(f.name)
        shown = f"default job: {value}"
        if plain is not None and plain.get(f.name) != value:
            shown = f"default: {plain.get(f.name)}; default job: {value}"
        elif plain is not None:
            shown = f"default: {value}"
        help_text = f"{f.metadata['help']} [YAML {dest}; {shown}]"
        if hints[f.name] is bool:
            parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        parse, choices = _parser_for(hints[f.name])
        parser.add_argument(
            flag,
            dest=dest,
            type=parse,
            choices=choices,
            metavar=None if choices else f.name.upper(),
            help=help_text,
        )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Nested dict of the options actually given (argparse.SUPPRESS hides the others)."""
    nested: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if "." not in dest and dest not in ("model", "output_dir", "preset"):
            continue
        section, _, name = dest.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[name] = value
    return nested


def _method_args(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as YAML (``4``, ``true``, ``[query, value]``)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--method-arg: expected key=value, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--method-arg {pair!r}: value is not valid YAML ({err})") from err
    return out


# ----------------------------------------------------------------------- train
def _build_run_config(args: argparse.Namespace, base: dict[str, Any] | None = None):
    from .runner.config import RunConfig, apply_preset, base_run_dict, merge, read_yaml

    user = read_yaml(args.config) if args.config is not None else {}
    overrides = _overrides(args)
    if base is None:
        # The default job's own settings (train_size ...) only for the default job's data.
        section = user.get("data")
        data = merge(section if isinstance(section, dict) else {}, overrides.get("data", {}))
        base = base_run_dict(data.get("task"), data.get("data_dir"))
    config = merge(base, user)
    method = config.get("method") or {}
    method = {"name": method} if isinstance(method, str) else dict(method)
    method_override = overrides.pop("method", {})
    if "name" in method_override and method_override["name"] != method.get("name"):
        # Another method: the previous method's own fields would not fit it.
        method = {"target_rank": method.get("target_rank")}
        base = {**base, "method": dict(method)}
    method_args = _method_args(args.method_arg or [])
    method.update(method_override)
    method.update(method_args)
    config = merge(config, overrides)
    config["method"] = method
    if config.get("preset"):
        # The preset goes between the base job and what was set in YAML or options.
        user_method = user.get("method") or {}
        user_method = {"name": user_method} if isinstance(user_method, str) else user_method
        explicit = merge(user, overrides)
        explicit["method"] = {**user_method, **method_override, **method_args}
        config = apply_preset(base, explicit)
    return RunConfig.from_dict(config)


def _resolved_comments(config: Any) -> str:
    """What the run fills in when it starts, as YAML comments (the output stays a config)."""
    from .methods import get_method
    from .runner.config import default_learning_rate, method_defaults

    method = config.method
    lines = ["# Filled in when the run starts (not part of the config):"]
    lines.append(f"#   output_dir: {config.resolved_output_dir()}")
    if config.train.learning_rate is None:
        steps = config.train.planned_steps(config.data.train_size)
        entry = method_defaults(method.name, method.args, rank=method.target_rank, steps=steps)
        source = f" ({entry.source})" if entry is not None else " (the fallback for methods)"
        lr = default_learning_rate(method.name, method.args, rank=method.target_rank, steps=steps)
        lines.append(f"#   train.learning_rate: {lr}{source}")
        if steps is None:
            lines.append(
                "#     (train_size unset: the run takes the swept cell nearest its length)"
            )
    config_cls = get_method(method.name).config_class
    left = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(config_cls)
        if f.name not in method.args and f.name != "target_rank"
    }
    if left:
        values = ", ".join(f"{k}: {v!r}" for k, v in left.items())
        lines.append(
            f"#   method fields at their {config_cls.__name__} defaults (None: derived from the"
            f" model or the run length): {values}"
        )
    return "\n".join(lines) + "\n"


def _check_output_dir(out: Path) -> None:
    """Fail in one line, before anything loads, when the run directory cannot be written.

    Creates the missing folders and a temporary file (what the run will do), then removes
    what it created: a run that fails later leaves nothing behind.
    """
    import tempfile

    missing = []
    existing = out.absolute()
    while not existing.exists() and existing.parent != existing:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"--output-dir {out}: {existing} is a file, not a folder; choose another --output-dir"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ConfigError(
            f"--output-dir {out}: cannot write there ({err.strerror or err}); choose a"
            " writable --output-dir"
        ) from None
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def cmd_train(args: argparse.Namespace) -> int:
    from .io import read_json
    from .runner.loop import run
    from .runner.outputs import METRICS, RUN_CONFIG, format_summary

    config = _build_run_config(args)
    saved = config.resolved_output_dir() / RUN_CONFIG
    if args.resume and saved.is_file():
        # Continue the run as it was configured; options given now must not change it.
        config = _build_run_config(args, base=read_json(saved))
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        print(_resolved_comments(config), end="")
        return 0
    out = config.resolved_output_dir()
    if not (args.resume and (out / METRICS).is_file()):  # resuming a finished run writes nothing
        _check_output_dir(out)
    with _TermRaises() as term:
        try:
            result = run(config, resume=args.resume)
        except KeyboardInterrupt:
            # Outside the training loop (loading, finishing) or a signal while stopping.
            raise _stopped_outside_loop(out, term.received) from None
    if result.metrics is not None:
        print(format_summary(result.metrics, result.output_dir))
    return 0


class _TermRaises:
    """While a run is going on, SIGTERM raises KeyboardInterrupt instead of killing at once.

    The training loop installs its own handlers (stop at the next step with a checkpoint)
    and puts this one back after; a SIGTERM while loading, finishing, or while an
    interruption propagates then still ends with the "continue with --resume" line.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        raise KeyboardInterrupt

    def __enter__(self) -> _TermRaises:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _stopped_outside_loop(out: Path, signum: int | None) -> BaseException:
    """The TrainingInterrupted for an interruption the loop did not handle itself."""
    import signal

    from .runner.loop import TrainingInterrupted
    from .runner.outputs import CHECKPOINT, METRICS, RUN_CONFIG

    name = signal.Signals(signum).name if signum is not None else "KeyboardInterrupt"
    command = f"increlora train --resume --output-dir {out}"
    if (out / METRICS).is_file():
        state = f"the run had finished ({out / METRICS})"
    elif (out / CHECKPOINT).is_dir():
        state = f"the checkpoint in {out / CHECKPOINT} is kept; continue with `{command}`"
    elif (out / RUN_CONFIG).is_file():
        state = f"no checkpoint was written yet; start it again with `{command}`"
    else:
        state = "stopped before the run started; nothing was written"
    return TrainingInterrupted(f"{name}: {state}", signum or signal.SIGINT)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .runner.config import DataConfig, MethodSpec, RunConfig, TrainConfig, default_run_dict

    defaults = default_run_dict()
    plain = RunConfig().to_dict()
    differ = [
        (section, name)
        for section in ("data", "train")
        for name in defaults[section]
        if defaults[section][name] != plain[section][name]
    ]
    own = [f"{name} {defaults[section][name]}" for section, name in differ]
    general = [f"{name} {plain[section][name]}" for section, name in differ]
    parser = sub.add_parser(
        "train",
        help="fine-tune a model on a task (no arguments: the built-in default job)",
        description="Fine-tune a model on a task. Without options this runs the built-in"
        " default job (configs/default.yaml): MiniLM on Rotten Tomatoes (mr) with IncreLoRA"
        " at average rank 2 (2,000 examples, 189 steps: about 3 minutes on 2 CPU cores)."
        " Options override --config. The default job's own settings"
        f" ({', '.join(own)}) apply only to its task ({defaults['data']['task']}) read from"
        " the built-in source; another --task, or any --data-dir, starts from the plain"
        f" defaults ({', '.join(general)}: all of the task's training data unless"
        " --train-size says otherwise, evaluation every epoch).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        default=None,
        help="run YAML file (sections model, output_dir, data, method, train), or a built-in"
        " name: default",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run in --output-dir from its checkpoint (its saved configuration"
        " is used; options may only change stop_at_step and report_to)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        default=False,
        help="print the resolved configuration as YAML (method fields checked, defaults"
        " the run fills in as comments) and exit without loading the model or data",
    )
    _add_field_options(
        parser, RunConfig, None, defaults, skip=("data", "method", "train"), plain=plain
    )
    run_group = parser.add_argument_group("method")
    run_group.add_argument(
        "--method",
        dest="method.name",
        metavar="NAME",
        help=MethodSpec.__dataclass_fields__["name"].metadata["help"],
    )
    _add_field_options(
        run_group,
        MethodSpec,
        "method",
        defaults["method"],
        skip=("name", "args"),
        plain=plain["method"],
    )
    run_group.add_argument(
        "--method-arg",
        dest="method_arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a field of the method's config (repeatable), e.g. --method-arg top_h=4"
        " --method-arg 'target_modules=[query, value]'",
    )
    _add_field_options(
        parser.add_argument_group("data"), DataConfig, "data", defaults["data"], plain=plain["data"]
    )
    _add_field_options(
        parser.add_argument_group("training"),
        TrainConfig,
        "train",
        defaults["train"],
        plain=plain["train"],
    )
    parser.add_argument(
        "--lr",
        dest="train.learning_rate",
        type=float,
        metavar="LEARNING_RATE",
        help="same as --learning-rate",
    )
    parser.set_defaults(func=cmd_train)


# -------------------------------------------------------------- evaluate / export
def _eval_settings(args: argparse.Namespace):
    """Settings for reloading: the run's run_config.json (next to the adapter) + options."""
    from .io import read_json
    from .runner.evaluate import EvalSettings
    from .runner.outputs import RUN_CONFIG

    values: dict[str, Any] = {}
    saved = Path(args.adapter).parent / RUN_CONFIG
    if saved.is_file():
        run = read_json(saved)
        data = run.get("data", {})
        values = {
            "model": run.get("model"),
            "task": data.get("task"),
            "data_dir": data.get("data_dir"),
            "max_length": data.get("max_length"),
            "eval_size": data.get("eval_size"),
            "split_seed": data.get("split_seed"),
            "validation_size": data.get("validation_size"),
            "max_new_tokens": data.get("max_new_tokens"),
        }
    for key in ("model", "task", "data_dir", "max_length", "eval_size", "split_seed", "batch_size"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    adapter = Path(args.adapter)
    if not adapter.exists():
        raise ConfigError(f"--adapter {adapter}: adapter not found (no such folder)")
    if (adapter / RUN_CONFIG).is_file() and not saved.is_file():
        raise ConfigError(
            f"--adapter {adapter} is a run directory; pass its adapter folder:"
            f" --adapter {adapter / 'adapter'}"
        )
    missing = [k for k in ("model", "task") if not values.get(k)]
    if missing:
        raise ConfigError(
            f"--{' and --'.join(missing)} needed (no run_config.json next to {args.adapter})"
        )
    return EvalSettings(**{k: v for k, v in values.items() if v is not None})


def _add_reload_options(parser: argparse.ArgumentParser, data: bool) -> None:
    """--adapter, the base model and task (for its head) and, to evaluate, the data."""
    parser.add_argument(
        "--adapter",
        required=True,
        help="adapter directory: PEFT (adapter_config.json) or increlora (increlora_config.json)",
    )
    parser.add_argument("--model", help="base model (default: the run's, from run_config.json)")
    parser.add_argument("--task", help="task, which sets the head (default: the run's)")
    if data:
        parser.add_argument("--data-dir", help="task data folder (default: the run's)")
        parser.add_argument(
            "--max-length", type=int, help="tokens per example (default: the run's)"
        )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .runner.evaluate import evaluate_adapter

    result = evaluate_adapter(args.adapter, _eval_settings(args))
    if args.output:
        atomic_write_json(args.output, result)
    print(json.dumps({"task": result["task"], "metrics": result["metrics"]}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .runner.export import export_adapter

    settings = _eval_settings(args)
    written = export_adapter(args.adapter, settings, args.output, args.format)
    print(f"increlora: wrote {written}")
    return 0


def _add_evaluate_export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="evaluate a saved adapter on a task",
        description="Load the base model with its task head, put the adapter on it, and"
        " print the task's metrics. Inside a run directory, model/task/data default to the"
        " run's.",
    )
    _add_reload_options(parser, data=True)
    parser.add_argument("--eval-size", type=int, help="evaluate on a subset (default: the run's)")
    parser.add_argument("--split-seed", type=int, help="seed of splits (default: the run's)")
    parser.add_argument("--batch-size", type=int, help="examples per batch (default 64)")
    parser.add_argument("--output", help="also write the metrics JSON to this file")
    parser.set_defaults(func=cmd_evaluate)

    parser = sub.add_parser(
        "export",
        help="convert a saved adapter: to PEFT LoRA, or merged into a full model",
        description="--format peft: an increlora adapter to a PEFT LoRA adapter directory."
        " --format merged: base + adapter folded into one model saved with save_pretrained"
        " (with its tokenizer), loadable without increlora or peft.",
    )
    _add_reload_options(parser, data=False)
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument(
        "--format",
        choices=("peft", "merged"),
        default="merged",
        help="peft: a PEFT LoRA adapter; merged: a full model (default)",
    )
    parser.set_defaults(func=cmd_export)


# ---------------------------------------------------------------- bench / report
def cmd_bench(args: argparse.Namespace) -> int:
    from .runner.bench import run_bench
    from .runner.loop import TrainingInterrupted

    try:
        summary = run_bench(args.spec, output_dir=args.output_dir, dry_run=args.dry_run)
    except TrainingInterrupted as err:
        # The bench, not one run, is what to continue: rerunning it resumes that run.
        again = f"increlora bench {args.spec}" + (
            f" --output-dir {args.output_dir}" if args.output_dir else ""
        )
        message = re.sub(
            r"[;.]?\s*(?:[Cc]ontinue|start it again) with `increlora train --resume[^`]*`\.?",
            "",
            str(err),
        )
        raise TrainingInterrupted(
            f"{message}; run `{again}` again to continue the bench (the interrupted run"
            " resumes from its checkpoint, finished runs are skipped)",
            err.exit_code - 128,
        ) from None
    return 1 if summary["failed"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    from .runner.report import save_summaries, write_report

    if args.save_summaries:
        count = save_summaries(args.directory, args.save_summaries)
        print(f"increlora: copied the summaries of {count} runs to {args.save_summaries}")
    path = write_report(args.directory, args.output)
    if args.output is None:
        print(Path(path).read_text(encoding="utf-8"))
    else:  # the file is what was asked for; the terminal gets where it went
        print(f"increlora: wrote {path} (figures in {Path(path).stem}_figures/)")
    return 0


def _add_bench_report(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="run a matrix of methods x tasks x budgets x sizes x seeds (resumable)",
        description="Run every combination of a bench spec. Finished runs are skipped and"
        " interrupted ones resumed, so a long matrix can be run in several sittings.",
    )
    parser.add_argument("spec", help="bench YAML file, or the built-in name cpu_bench")
    parser.add_argument("--output-dir", help="bench directory (default: the spec's output_dir)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    parser.set_defaults(func=cmd_bench)

    parser = sub.add_parser(
        "report",
        help="the benchmark report of a bench directory: tables, lr choice, paired diffs, plots",
        description="Tables per task and size (validation and test, mean +- std over seeds),"
        " the learning rate chosen on validation, paired per-seed differences of IncreLoRA vs"
        " LoRA and AdaLoRA, and plots. A directory of several benches gets a section each.",
    )
    parser.add_argument("directory", help="bench directory, or a folder of them (e.g. results/)")
    parser.add_argument("--output", help="markdown file (default: DIRECTORY/report.md)")
    parser.add_argument(
        "--save-summaries",
        metavar="DEST",
        help="first copy each finished run's metrics.json and run_config.json (no weights)"
        " to DEST, keeping the relative paths (e.g. results/<bench>)",
    )
    parser.set_defaults(func=cmd_report)


# ------------------------------------------------------------------------ tasks
def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import load_task
    from .tasks.catalog import check, listing

    if not args.check:
        print(listing())
        return 0
    failures = check(load_task, args.cache_dir)
    for line in failures:
        print(f"increlora: task {line}", file=sys.stderr)
    if not failures:
        print("increlora: every built-in task fetched into a fresh cache and loaded")
    return 1 if failures else 0


def _add_tasks(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "tasks",
        help="list the built-in tasks: kind, source archive, licence, split sizes, cached or not",
        description="List every built-in task with data of its own (no download). --check"
        " fetches each into a fresh cache and loads it, one line per task that failed.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="fetch every task into a fresh cache (a temporary folder) and load it",
    )
    parser.add_argument(
        "--cache-dir", help="with --check: the cache to fetch into (default: a fresh temporary one)"
    )
    parser.set_defaults(func=cmd_tasks)


# ------------------------------------------------------------------------ main
class _TqdmHandler(logging.Handler):
    """Log lines that do not break a progress bar on screen."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging() -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("increlora: %(message)s"))
    root = logging.getLogger("increlora")
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # we report newly initialized heads ourselves
        hf_logging.disable_progress_bar()  # weight loading takes seconds: no bar needed
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="increlora",
        description="Fine-tune with IncreLoRA (rank grows during training) and its baselines.",
    )
    parser.add_argument("--version", action="version", version=f"increlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_evaluate_export(sub)
    _add_bench_report(sub)
    _add_tasks(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``increlora`` console script; returns the exit code."""
    from .runner.data import DataError
    from .runner.loop import TrainingStopped
    from .runner.model import ModelLoadError

    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except TrainingStopped as err:
        print(f"increlora: {err}", file=sys.stderr)
        return err.exit_code
    except (*_INPUT_ERRORS, DataError, ModelLoadError) as err:
        print(f"increlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("increlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
