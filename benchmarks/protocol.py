"""Run the benchmark protocol of docs/benchmark.md: sweep, choose on validation, test on fresh seeds.

    python benchmarks/protocol.py SWEEP_SPEC [SWEEP_SPEC ...] FINAL_SPEC [--results results]
        [--check-edges] [--confirm-seed 6 [--confirm-top 2]]

1. Runs every sweep spec (``increlora bench``: resumable, finished runs are skipped).
   With ``--check-edges``: a method whose best rate is the grid's smallest or largest gets the
   next rate beyond it on the 1-2-5 ladder (e.g. 5e-3 -> 1e-2), on the sweep's seed, in the
   first sweep's output directory; repeated while the best stays at the edge (at most 3 steps).
   With ``--confirm-seed N``: each method's ``--confirm-top`` best rates (default 2) run again
   on seed N (``<first sweep output>/seed=N``), and the choice is made among the rates with the
   most seeds, by their mean. The issue-20 GLUE study runs both.
2. Per method label, picks the learning rate with the best mean validation score over the
   sweep's runs (the test split is never read); a rate run on more seeds goes first.
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
import json
import math
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


def sweep_scores(
    sweep_dirs: list[Path], seed: int | None = None
) -> dict[str, dict[float, list[float]]]:
    """label -> {lr: validation scores, one per seed} over the finished sweep runs (only
    ``seed``'s when given)."""
    scores: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for directory in dict.fromkeys(sweep_dirs):  # each directory once
        for run in collect(directory):
            if seed is None or run.seed == seed:
                scores[run.method][run.learning_rate].append(run.validation)
    return scores


def choose_learning_rates(sweep_dirs: list[Path]) -> dict[str, tuple[float, dict[float, float]]]:
    """label -> (chosen lr, {lr: mean validation score}) over the finished sweep runs.

    Among a label's rates, those run on the most seeds compete (a confirmed rate is not beaten
    by one lucky seed), by mean validation score; ties go to the smaller rate.
    """
    chosen = {}
    for label, by_lr in sweep_scores(sweep_dirs).items():
        means = {lr: statistics.fmean(values) for lr, values in sorted(by_lr.items())}
        seeds = {lr: len(values) for lr, values in by_lr.items()}
        best = max(means, key=lambda lr: (seeds[lr], means[lr], -lr))
        chosen[label] = (best, means)
    return chosen


_LADDER_UP = {1: 2, 2: 5, 5: 10}
_LADDER_DOWN = {1: 0.5, 2: 1, 5: 2}


def beyond_edge(learning_rate: float, up: bool) -> float:
    """The next rate past ``learning_rate`` on the 1-2-5 ladder (x2 / /2 off the ladder)."""
    exponent = math.floor(math.log10(learning_rate))
    mantissa = round(learning_rate / 10**exponent, 6)
    table = _LADDER_UP if up else _LADDER_DOWN
    if mantissa in table:
        return float(f"{table[mantissa] * 10**exponent:.6g}")
    return float(f"{learning_rate * (2 if up else 0.5):.6g}")


def _entries(spec: dict) -> dict[str, dict]:
    out = {}
    for entry in spec["matrix"]["method"]:
        entry = dict(entry) if isinstance(entry, dict) else {"name": entry}
        out[entry.get("label", entry["name"])] = entry
    return out


def extra_specs(sweep: dict, needs: dict[float, list[str]], seed: int | None) -> list[dict]:
    """One bench spec per learning rate: the sweep's base and the methods in ``needs[lr]``, on
    the sweep's seed (output: the sweep's directory) or on ``seed`` (``<sweep>/seed=N``)."""
    entries = _entries(sweep)
    base = json.loads(json.dumps(sweep.get("base") or {}))
    out_dir = str(output_dir_of(sweep))
    if seed is not None:
        base.setdefault("train", {})["seed"] = seed
        out_dir = f"{out_dir}/seed={seed}"
    specs = []
    for lr, labels in sorted(needs.items()):
        specs.append(
            {
                "output_dir": out_dir,
                "base": base,
                "matrix": {
                    "train.learning_rate": [lr],
                    "method": [e for label, e in entries.items() if label in labels],
                },
            }
        )
    return specs


def edge_needs(
    sweep_dirs: list[Path], seed: int, done: set[tuple[str, float]]
) -> dict[float, list[str]]:
    """{rate beyond the edge: labels} for labels whose best rate on the sweep's ``seed`` is at
    the edge of the rates tried on it."""
    needs: dict[float, list[str]] = defaultdict(list)
    for label, by_lr in sweep_scores(sweep_dirs, seed).items():
        means = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
        best = max(means, key=lambda lr: (means[lr], -lr))
        if at_grid_edge(best, list(means)):
            nxt = beyond_edge(best, up=best == max(means))
            if (label, nxt) not in done:
                needs[nxt].append(label)
    return dict(needs)


def confirm_needs(sweep_dirs: list[Path], seed: int, top: int) -> dict[float, list[str]]:
    """{rate: labels} for each label's ``top`` best rates on the sweep's ``seed``."""
    needs: dict[float, list[str]] = defaultdict(list)
    for label, by_lr in sweep_scores(sweep_dirs, seed).items():
        means = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
        for lr in sorted(means, key=lambda lr: (-means[lr], lr))[:top]:
            needs[lr].append(label)
    return dict(needs)


def _run_specs(specs: list[dict], name: str) -> int:
    """Write each generated spec next to its runs and run it; returns failed runs."""
    failed = 0
    for spec in specs:
        out = Path(spec["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        rate = spec["matrix"]["train.learning_rate"][0]
        path = out / f"spec.{name}-lr{rate:g}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        failed += len(run_bench(path)["failed"])
    return failed


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
        "--check-edges",
        action="store_true",
        help="extend the grid one 1-2-5 step past a best rate at its edge (sweep seed)",
    )
    parser.add_argument(
        "--confirm-seed",
        type=int,
        help="run each method's --confirm-top best rates again on this seed before choosing",
    )
    parser.add_argument("--confirm-top", type=int, default=2)
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
    sweep_dirs = sorted({_out(s) for s in sweeps})
    first = read_yaml(sweeps[0])
    sweep_seed = int(((first.get("base") or {}).get("train") or {}).get("seed", 0))
    if args.check_edges:
        done: set[tuple[str, float]] = set()
        for _ in range(3):
            needs = edge_needs(sweep_dirs, sweep_seed, done)
            if not needs:
                break
            for lr, labels in needs.items():
                done.update((label, lr) for label in labels)
                print(f"protocol: edge check: {', '.join(labels)} at lr {lr:g}", file=sys.stderr)
            failed += _run_specs(extra_specs(first, needs, None), "edge")
            publish(_out(sweeps[0]))
    if args.confirm_seed is not None:
        needs = confirm_needs(sweep_dirs, sweep_seed, args.confirm_top)
        for lr, labels in sorted(needs.items()):
            print(
                f"protocol: seed {args.confirm_seed}: {', '.join(labels)} at lr {lr:g}",
                file=sys.stderr,
            )
        failed += _run_specs(extra_specs(first, needs, args.confirm_seed), "confirm")
        publish(_out(sweeps[0]))
    chosen = choose_learning_rates(sweep_dirs)
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
