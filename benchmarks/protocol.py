"""Run the benchmark protocol of docs/benchmark.md: sweep, choose on validation, test on fresh seeds.

    python benchmarks/protocol.py SWEEP_SPEC [SWEEP_SPEC ...] FINAL_SPEC [--results results]

1. Runs every sweep spec (``increlora bench``: resumable, finished runs are skipped).
2. Per method label, picks the learning rate with the best mean validation score over the
   sweep's runs (the test split is never read).
3. Writes FINAL_SPEC with every ``learning_rate: sweep`` replaced by that choice to
   ``<final output_dir>/spec.resolved.yaml`` (with a comment per choice) and runs it.
4. With ``--results DIR``, copies the small per-run summaries of the sweep and final benches
   into ``DIR/<bench>`` after each bench, so finished runs can be committed as they land;
   and before running, restores the runs already summarised in ``DIR/<bench>`` into the
   bench's output directory, so a fresh clone resumes from the committed results.

Interrupt it at any time and run the same command again to continue.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from increlora.runner.bench import output_dir_of, run_bench
from increlora.runner.config import read_yaml
from increlora.runner.report import (
    at_grid_edge,
    collect,
    restore_summaries,
    save_summaries,
)


def choose_learning_rates(sweep_dirs: list[Path]) -> dict[str, tuple[float, dict[float, float]]]:
    """label -> (chosen lr, {lr: mean validation score}) over the finished sweep runs."""
    scores: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for directory in sweep_dirs:
        for run in collect(directory):
            scores[run.method][run.learning_rate].append(run.validation)
    chosen = {}
    for label, by_lr in scores.items():
        means = {lr: statistics.fmean(values) for lr, values in sorted(by_lr.items())}
        # Ties go to the smaller learning rate (listed first).
        best = max(means, key=lambda lr: (means[lr], -lr))
        chosen[label] = (best, means)
    return chosen


def resolve(final_spec: dict, chosen: dict[str, tuple[float, dict[float, float]]]) -> dict:
    methods = []
    for entry in final_spec["matrix"]["method"]:
        entry = dict(entry) if isinstance(entry, dict) else {"name": entry}
        label = entry.get("label", entry["name"])
        if entry.get("learning_rate") == "sweep":
            if label not in chosen:
                raise SystemExit(f"final spec: no finished sweep runs for method {label!r}")
            entry["learning_rate"] = chosen[label][0]
        methods.append(entry)
    return {**final_spec, "matrix": {**final_spec["matrix"], "method": methods}}


def supersede(spec: dict, results: Path | None) -> list[str]:
    """Remove the finished runs of ``spec`` that ran at another learning rate than the one it
    now asks for (a sweep was extended and chose anew), with their summaries in ``results``,
    so that they run again at the new rate. Returns the run keys removed."""
    import shutil

    from increlora.io import read_json
    from increlora.runner import outputs as O
    from increlora.runner.bench import expand

    out = output_dir_of(spec)
    removed = []
    for bench_run in expand(spec, out):
        metrics = out / bench_run.key / O.METRICS
        wanted = bench_run.config.train.learning_rate
        if wanted is None or not metrics.is_file():
            continue
        if float(read_json(metrics)["resolved"]["learning_rate"]) != wanted:
            shutil.rmtree(out / bench_run.key)
            if results is not None:
                shutil.rmtree(results / out.name / bench_run.key, ignore_errors=True)
            removed.append(bench_run.key)
    return removed


def _out(spec_path: str) -> Path:
    return output_dir_of(read_yaml(spec_path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", help="sweep spec(s), then the final spec")
    parser.add_argument("--results", help="copy run summaries to RESULTS/<bench> as they land")
    parser.add_argument(
        "--supersede",
        action="store_true",
        help="re-run final runs that finished at another learning rate than the sweeps now"
        " choose (after a sweep was extended); their old summaries are removed",
    )
    args = parser.parse_args(argv)
    if len(args.specs) < 2:
        parser.error("give at least one sweep spec and the final spec")
    *sweeps, final = args.specs
    failed = 0

    def publish(directory: Path) -> None:
        if args.results:
            save_summaries(directory, Path(args.results) / directory.name)

    if args.results:
        for directory in sorted({_out(spec) for spec in args.specs}):
            summaries = Path(args.results) / directory.name
            restored = restore_summaries(summaries, directory)
            if restored:
                print(
                    f"protocol: {directory}: {restored} finished runs restored from {summaries}",
                    file=sys.stderr,
                )
    for spec in sweeps:
        failed += len(run_bench(spec)["failed"])
        publish(_out(spec))
    chosen = choose_learning_rates(sorted({_out(s) for s in sweeps}))
    for label, (lr, means) in sorted(chosen.items()):
        curve = ", ".join(f"{k:g}: {v:.3f}" for k, v in means.items())
        print(f"protocol: {label}: lr {lr:g} chosen on validation ({curve})", file=sys.stderr)
        if at_grid_edge(lr, list(means)):
            print(
                f"protocol: warning: {label}: {lr:g} is the grid's edge; the grid may understate"
                " it (extend the grid one step to check)",
                file=sys.stderr,
            )
    spec = resolve(read_yaml(final), chosen)
    if args.supersede:
        results = Path(args.results) if args.results else None
        for key in supersede(spec, results):
            print(f"protocol: {key}: ran at another rate; removed to run again", file=sys.stderr)
    out = _out(final)
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "spec.resolved.yaml"
    header = "".join(
        f"# {label}: lr {lr:g} chosen on validation over"
        f" {', '.join(f'{k:g}={v:.3f}' for k, v in means.items())}\n"
        for label, (lr, means) in sorted(chosen.items())
    )
    resolved.write_text(header + yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    failed += len(run_bench(resolved)["failed"])
    publish(out)
    return 1 if failed else 0


def cli(argv: list[str] | None = None) -> int:
    """``main`` with a stopped run (Ctrl-C, SIGTERM) reported in one line, not a traceback."""
    from increlora.runner.loop import TrainingStopped

    try:
        return main(argv)
    except TrainingStopped as err:
        print(f"protocol: {err}; run the same command again to continue", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(cli())
