"""A sweep folder as tables and plots: score (mean +- std over seeds) per task and averaged over tasks,
next to what it cost (the paper's claims are about cost), and how evenly routed methods use their prompts.

Reads every results.json under the folder (Hydra multiruns of train.py, from sweep.py or not), so it
groups runs by what results.json says (method, shape, router, model), not by folder names. Only training runs
count: a job that stopped before training (a config error) is a failed job, not a run; a `train=false`
re-evaluation of a checkpoint is not another seed; a second run of the same configuration, task and seed is
listed, not averaged in.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smop.sweeps import MANIFEST, RESULTS_FILE, TASKS

SCORE_RANGE = (0.0, 100.0)  # scores are official metrics x100: error bars stop at what a score can be
MEMORY_KEY = "peak_memory_bytes"

COST_KEYS = ("train_time_s", "peak_memory_bytes", "inference_flops_per_example")
PLOTS = (  # (cost key, axis label, file name): the three panels of the paper's Figure 1
    ("train_time_s", "training time (s)", "score_vs_train_time.png"),
    (MEMORY_KEY, "peak training memory (GiB)", "score_vs_memory.png"),
    ("inference_flops_per_example", "inference FLOPs per example (multiply-adds)", "score_vs_inference_flops.png"),
)
FLOP_KEYS = ("inference_flops_per_example",)


@dataclass
class Run:
    """One results.json, reduced to what the tables need."""

    path: str  # the run's folder, relative to the sweep folder
    status: str
    model: str
    method: str
    router: str | None
    num_prompts: int | None
    prompt_length: int | None
    dataset: str
    seed: int | None
    score: float | None  # official metrics' mean on the split, in percent
    cost: dict[str, float | None]
    trainable: int | None
    routing_entropy: float | None
    routing_max_share: float | None
    memory_kind: str | None = None  # cuda_max_allocated or cpu_peak_rss: not comparable with each other
    error: str | None = None
    trained: bool = True  # false: a train=false evaluation of a checkpoint, not a training run
    built: bool = True  # false: stopped before any model was built (a config error): a failed job, not a run
    shared_process: bool | None = None  # ran in a process other jobs used too (Hydra's basic/joblib multirun)

    @property
    def config(self) -> str:
        shape = ""
        if self.num_prompts is not None and self.prompt_length is not None:
            shape = f" {self.num_prompts}x{self.prompt_length}"
        elif self.prompt_length:
            shape = f" L={self.prompt_length}"
        return f"{self.method}{shape}" + (f" ({self.router})" if self.router else "")


def routing_specialisation(counts: list[int] | None) -> tuple[float | None, float | None]:
    """Entropy of the routing distribution over log K (1: prompts used evenly, 0: all to one) and the top share."""
    if not counts or len(counts) < 2 or sum(counts) <= 0:
        return None, None
    total = sum(counts)
    shares = [c / total for c in counts]
    entropy = sum(-p * math.log(p) for p in shares if p > 0) / math.log(len(counts))
    return abs(entropy), max(shares)  # abs: no -0.0 when every example went to one prompt


def split_score(metrics: dict[str, float] | None) -> float | None:
    """The task's score (mean of its official metrics) in percent; `score` when the run logged it."""
    if not metrics:
        return None
    value = metrics.get("score", statistics.mean(metrics.values()) if metrics else None)
    return None if value is None else 100.0 * float(value)


def read_run(path: Path, sweep_dir: Path, split: str) -> Run:
    results = json.loads(path.read_text())
    config = results.get("config") or {}
    method_cfg = config.get("method") or {}
    routed = results.get("router") is not None
    entropy, max_share = routing_specialisation(((results.get("routing") or {}).get("counts") or {}).get(split))
    return Run(
        path=str(path.parent.relative_to(sweep_dir)),
        status=str(results.get("status")),
        model=str(results.get("model")),
        method=str(results.get("method")),
        router=results.get("router"),
        num_prompts=method_cfg.get("num_prompts") if routed else None,
        prompt_length=method_cfg.get("prompt_length"),
        dataset=str(results.get("dataset")),
        seed=results.get("seed"),
        score=split_score((results.get("metrics") or {}).get(split)),
        cost={k: (results.get("cost") or {}).get(k) for k in COST_KEYS},
        trainable=(results.get("params") or {}).get("trainable"),
        routing_entropy=entropy,
        routing_max_share=max_share,
        memory_kind=(results.get("cost") or {}).get("memory_kind"),
        error=results.get("error"),
        trained=bool(config.get("train", True)),
        built=results.get("params") is not None,
        shared_process=shared_process(path.parent),
    )


def shared_process(run_dir: Path) -> bool | None:
    """Whether the run shared its process with other jobs, from Hydra's record of it (.hydra/hydra.yaml): a
    multirun's basic launcher runs every job in one process and joblib reuses its workers, so a process's peak
    RSS carries over between jobs; a single run and a submitit job have a process each. None: no record."""
    import yaml

    try:
        hydra = (yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text()) or {}).get("hydra") or {}
    except (OSError, yaml.YAMLError):
        return None
    if str(hydra.get("mode")) != "MULTIRUN":
        return False
    return "submitit" not in str((hydra.get("launcher") or {}).get("_target_", ""))


def load_runs(sweep_dir: Path, split: str = "test") -> list[Run]:
    """Every results.json under the folder, except the sweep's own folders (`_jobs`, `_attempts`, ...)."""
    paths = sorted(
        p
        for p in sweep_dir.rglob(RESULTS_FILE)
        if not any(part.startswith("_") for part in p.relative_to(sweep_dir).parts)
    )
    return [read_run(p, sweep_dir, split) for p in paths]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


@dataclass
class Row:
    """One configuration: its score per task and averaged over tasks, its cost averaged over tasks."""

    config: str
    runs: list[Run]
    tasks: dict[str, tuple[float | None, float | None, int]] = field(default_factory=dict)  # mean, std, seeds
    average: tuple[float | None, float | None, int] = (None, None, 0)
    cost: dict[str, float | None] = field(default_factory=dict)
    trainable: int | None = None
    routing_entropy: float | None = None
    routing_max_share: float | None = None


def task_order(datasets: set[str]) -> list[str]:
    return [t for t in TASKS if t in datasets] + sorted(datasets - set(TASKS))


def read_manifest(sweep_dir: Path) -> dict[str, Any]:
    """sweep.py's record of the grid's jobs (absent for multiruns launched otherwise)."""
    try:
        return json.loads((sweep_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class Sorted:
    """A sweep folder's results.json files, by what they are; only `counted` enters the tables and plots."""

    counted: list[Run] = field(default_factory=list)  # completed training runs, one per configuration, task, seed
    failed_runs: list[Run] = field(default_factory=list)  # a model was built, then it failed (NaN, out of memory)
    failed_jobs: list[tuple[str, str]] = field(default_factory=list)  # (job, reason): no run happened
    reevaluations: list[Run] = field(default_factory=list)  # train=false: a checkpoint evaluated again
    duplicates: list[tuple[Run, Run]] = field(default_factory=list)  # (run, the counted run with its seed)
    unscored: list[Run] = field(default_factory=list)  # completed without a score on the split (test=false)


def sort_runs(runs: list[Run], manifest: dict[str, Any]) -> Sorted:
    """Keep what is not a training run out of the seeds: jobs that stopped before training (config errors, and
    sweep.py's jobs that left no results.json), `train=false` re-evaluations and repeated seeds."""
    out = Sorted()
    seen: dict[tuple[Any, ...], Run] = {}
    for run in runs:
        if not run.built:
            out.failed_jobs.append((run.path, run.error or f"status {run.status}"))
        elif run.status != "completed":
            out.failed_runs.append(run)
        elif not run.trained:
            out.reevaluations.append(run)
        elif run.score is None:
            out.unscored.append(run)
        elif (key := (run.model, run.config, run.dataset, run.seed)) in seen:
            out.duplicates.append((run, seen[key]))
        else:
            seen[key] = run
            out.counted.append(run)
    paths = {r.path for r in runs}
    for name, entry in sorted(manifest.get("jobs", {}).items()):
        if name not in paths and entry.get("status") in ("failed", "not_started"):
            out.failed_jobs.append((name, str(entry.get("error"))))
    return out


def aggregate(done: list[Run], order: list[str] | None = None) -> tuple[list[Row], list[str]]:
    """Counted runs (completed training runs, one per seed) grouped by configuration (and model, when the sweep
    holds several).

    Rows follow `order` (job names, the grid's order) where a run's folder is in it, then method and shape.
    """
    tasks = task_order({r.dataset for r in done})
    several_models = len({r.model for r in done}) > 1
    position = {name: i for i, name in enumerate(order or [])}
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in sorted(
        done,
        key=lambda r: (
            position.get(r.path, len(position)),
            r.model,
            r.method,
            r.num_prompts or 0,
            r.prompt_length or 0,
            r.router or "",
        ),
    ):
        groups[f"{run.model}: {run.config}" if several_models else run.config].append(run)
    rows = []
    for config, members in groups.items():
        row = Row(config, members)
        by_task = {t: [r for r in members if r.dataset == t] for t in tasks}
        for task, task_runs in by_task.items():
            if task_runs:
                mean, std = mean_std([r.score for r in task_runs])
                row.tasks[task] = (mean, std, len(task_runs))
        if len(row.tasks) == len(tasks):  # an average over fewer tasks would not compare with the others
            seeds = set.intersection(*({r.seed for r in by_task[t]} for t in tasks))
            per_seed = [
                statistics.mean(next(r.score for r in by_task[t] if r.seed == s) for t in tasks)
                for s in sorted(seeds, key=str)
            ]
            row.average = (
                statistics.mean(m for m, _, _ in row.tasks.values()),
                statistics.stdev(per_seed) if len(per_seed) > 1 else None,
                len(per_seed),
            )
        present = [t for t in tasks if by_task[t]]  # cost: mean over tasks of the mean over seeds
        row.cost = {k: _mean([_mean([r.cost[k] for r in by_task[t]]) for t in present]) for k in COST_KEYS}
        row.trainable = max((r.trainable for r in members if r.trainable is not None), default=None)
        row.routing_entropy = _mean([r.routing_entropy for r in members])
        row.routing_max_share = _mean([r.routing_max_share for r in members])
        rows.append(row)
    return rows, tasks


def memory_note(runs: list[Run]) -> tuple[bool, str | None]:
    """Whether the memory figures of these runs may be plotted, and what to say of them.

    CUDA figures are reset per run; CPU figures are the process's peak RSS, comparable only with one process
    per job. Mixed kinds are not plotted at all."""
    kinds = {r.memory_kind for r in runs if r.cost.get(MEMORY_KEY) is not None}
    if len(kinds) > 1:
        return False, f"peak memory mixes {' and '.join(sorted(map(str, kinds)))}, which do not compare: no memory plot"
    if kinds == {"cpu_peak_rss"} and any(r.shared_process is not False for r in runs):
        shared = "jobs shared a process" if any(r.shared_process for r in runs) else "jobs may have shared a process"
        return True, (
            f"peak memory is the CPU process's peak RSS and {shared} (a multirun's basic or joblib launcher): a "
            "job's figure includes the jobs before it, so the figures do not compare between jobs"
        )
    return True, None


# --- formatting ---------------------------------------------------------------------------------------
def fmt_score(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def fmt_si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}".rstrip()
    return f"{value:.3g} {unit}".rstrip()


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _first_line(reason: str | None) -> str:
    return reason.splitlines()[0] if reason else "?"


def to_markdown(
    rows: list[Row], tasks: list[str], runs: Sorted, sweep_dir: Path, split: str, memory: str | None = None
) -> str:
    routed = any(r.routing_entropy is not None for r in rows)
    kinds = sorted({r.memory_kind for r in runs.counted if r.memory_kind})
    header = [
        "config",
        *tasks,
        *(["avg"] if len(tasks) > 1 else []),
        "train time (s)",
        "peak memory",
        "inference FLOPs/ex",
        "trainable params",
        *(["routing entropy", "top prompt share"] if routed else []),
        "runs",
    ]
    counts = [f"{len(runs.counted)} runs in the table", f"{len(runs.failed_runs)} failed runs"]
    counts.append(f"{len(runs.failed_jobs)} failed jobs (stopped before training: not runs)")
    left_out = [
        (len(runs.reevaluations), "train=false re-evaluations"),
        (len(runs.duplicates), "repeated seeds"),
        (len(runs.unscored), f"completed runs without a {split} score"),
    ]
    counts += [f"{n} {what} (not counted)" for n, what in left_out if n]
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        ", ".join(counts) + ". Score: the task's "
        f"official metrics averaged, on the {split} split, x100; mean ± std over seeds (training runs only). Costs: "
        f"mean over tasks of the mean over seeds; memory kind: {', '.join(kinds) or '-'}"
        + (f" ({memory})" if memory else "")
        + "; FLOPs: fvcore multiply-adds."
        + (
            " Routing: on the split's examples, entropy / log K (1 = even use of the K prompts, 0 = one prompt) "
            "and the busiest prompt's share."
            if routed
            else ""
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for row in rows:
        cells = [row.config, *(fmt_score(*row.tasks[t][:2]) if t in row.tasks else "-" for t in tasks)]
        if len(tasks) > 1:
            cells.append(fmt_score(*row.average[:2]))
        cells += [
            f"{row.cost['train_time_s']:.1f}" if row.cost["train_time_s"] is not None else "-",
            fmt_bytes(row.cost[MEMORY_KEY]),
            fmt_si(row.cost["inference_flops_per_example"]),
            f"{row.trainable:,}" if row.trainable is not None else "-",
        ]
        if routed:
            cells += [fmt_share(row.routing_entropy), fmt_share(row.routing_max_share)]
        cells.append(str(len(row.runs)))
        lines.append("| " + " | ".join(cells) + " |")
    sections = [
        ("Failed runs", [f"- `{r.path}`: {_first_line(r.error or f'status {r.status}')}" for r in runs.failed_runs]),
        (
            "Failed jobs (stopped before training: not runs)",
            [f"- `{name}`: {_first_line(reason)}" for name, reason in runs.failed_jobs],
        ),
        (
            "Re-evaluations (train=false: not seeds)",
            [
                f"- `{r.path}`: {r.config} on {r.dataset}, seed {r.seed}: {fmt_score(r.score, None)}"
                for r in runs.reevaluations
            ],
        ),
        (
            "Repeated seeds (not counted)",
            [
                f"- `{r.path}`: {r.config} on {r.dataset}, seed {r.seed}, as `{kept.path}`"
                for r, kept in runs.duplicates
            ],
        ),
        (f"Completed without a {split} score", [f"- `{r.path}`: {r.config} on {r.dataset}" for r in runs.unscored]),
    ]
    for title, items in sections:
        if items:
            lines += ["", f"## {title}", "", *items]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], tasks: list[str], path: Path) -> None:
    fields = ["config", "model", "method", "router", "num_prompts", "prompt_length", "runs"]
    fields += [c for t in tasks for c in (t, f"{t}_std", f"{t}_seeds")] + ["avg", "avg_std", "avg_seeds"]
    fields += [*COST_KEYS, "trainable_params", "routing_entropy", "routing_max_share"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            first = row.runs[0]
            record: dict[str, Any] = {
                "config": row.config,
                "model": first.model,
                "method": first.method,
                "router": first.router,
                "num_prompts": first.num_prompts,
                "prompt_length": first.prompt_length,
                "runs": len(row.runs),
                "avg": row.average[0],
                "avg_std": row.average[1],
                "avg_seeds": row.average[2],
                **row.cost,
                "trainable_params": row.trainable,
                "routing_entropy": row.routing_entropy,
                "routing_max_share": row.routing_max_share,
            }
            for task, (mean, std, n) in row.tasks.items():
                record.update({task: mean, f"{task}_std": std, f"{task}_seeds": n})
            writer.writerow(record)


def roles(runs: Sorted) -> dict[str, str]:
    """Each results.json's part in the summary, by folder: run, failed run, failed job, re-evaluation, ..."""
    role = {r.path: "run" for r in runs.counted}
    role.update({r.path: "failed run" for r in runs.failed_runs})
    role.update({name: "failed job" for name, _ in runs.failed_jobs})
    role.update({r.path: "re-evaluation" for r in runs.reevaluations})
    role.update({r.path: "repeated seed" for r, _ in runs.duplicates})
    role.update({r.path: "no score" for r in runs.unscored})
    return role


def write_runs_csv(runs: list[Run], role: dict[str, str], path: Path) -> None:
    """Every results.json, one line each, with its role: only `run` lines are in the tables."""
    fields = [
        "path",
        "role",
        "status",
        "config",
        "model",
        "dataset",
        "seed",
        "score",
        *COST_KEYS,
        "trainable_params",
        "routing_entropy",
        "routing_max_share",
        "error",
    ]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for run in runs:
            writer.writerow(
                {
                    "path": run.path,
                    "role": role.get(run.path),
                    "status": run.status,
                    "config": run.config,
                    "model": run.model,
                    "dataset": run.dataset,
                    "seed": run.seed,
                    "score": run.score,
                    **run.cost,
                    "trainable_params": run.trainable,
                    "routing_entropy": run.routing_entropy,
                    "routing_max_share": run.routing_max_share,
                    "error": run.error,
                }
            )


# --- plots --------------------------------------------------------------------------------------------
DODGE_POINTS = 7.0  # horizontal distance, in typographic points, between markers that share an x


def dodge(xs: list[float], tolerance: float = 0.01) -> list[float]:
    """An offset in points per marker: markers at (nearly) the same x are spread side by side, centred on it,
    so none hides another; the data keep their true x."""
    offsets = [0.0] * len(xs)
    ordered = sorted(range(len(xs)), key=lambda i: xs[i])
    group: list[int] = []
    for i in [*ordered, None]:
        if i is not None and group and abs(xs[i] - xs[group[0]]) <= tolerance * max(abs(xs[group[0]]), 1e-12):
            group.append(i)
            continue
        for j, member in enumerate(group):
            offsets[member] = (j - (len(group) - 1) / 2) * DODGE_POINTS
        group = [] if i is None else [i]
    return offsets


def error_bar(y: float, std: float | None) -> tuple[float, float] | None:
    """Below and above: mean ± std, cut at the scores' range."""
    if std is None:
        return None
    low, high = SCORE_RANGE
    return max(0.0, min(std, y - low)), max(0.0, min(std, high - y))


def figure(rows: list[Row], tasks: list[str], key: str, label: str, split: str = "test", caption: str | None = None):
    """Score against one cost: one marker per configuration (colour: method), side by side where they share an
    x, error bars of the std over seeds within [0, 100]; FLOPs in k/M/G units. None when no row has the cost."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter
    from matplotlib.transforms import ScaledTranslation

    def y_of(row: Row) -> tuple[float | None, float | None]:
        return row.average[:2] if len(tasks) > 1 else row.tasks[tasks[0]][:2]

    scale = 2**30 if key == MEMORY_KEY else 1.0
    points = [
        (row, row.cost[key] / scale, *y_of(row))
        for row in rows
        if row.cost.get(key) is not None and y_of(row)[0] is not None
    ]
    if not points:
        return None
    markers = "osD^v<>Pp*Xh"
    methods = sorted({r.runs[0].method for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4.5))
    offsets = dodge([x for _, x, _, _ in points])
    for i, ((row, x, y, std), offset) in enumerate(zip(points, offsets, strict=True)):
        bar = error_bar(y, std)
        container = ax.errorbar(
            [x],
            [y],
            yerr=[[bar[0]], [bar[1]]] if bar else None,
            fmt=markers[i % len(markers)],
            color=f"C{methods.index(row.runs[0].method) % 10}",
            markersize=8,
            capsize=3,
            alpha=0.85,
            label=row.config,
        )
        if offset:
            shift = ax.transData + ScaledTranslation(offset / 72, 0, fig.dpi_scale_trans)
            for artist in (container.lines[0], *container.lines[1], *container.lines[2]):
                artist.set_transform(shift)
    xs = [x for _, x, _, _ in points]
    ax.margins(x=0.12)  # room for the markers moved sideways at the ends
    log = min(xs) > 0 and max(xs) / min(xs) > 20
    if log:
        ax.set_xscale("log")
    if key in FLOP_KEYS:  # 4.87 M, not 4.87 with a 1e6 offset
        if log:
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(EngFormatter(sep=" "))
    ax.set_xlabel(label)
    ax.set_ylabel(f"{split} score, " + ("average over tasks" if len(tasks) > 1 else tasks[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if caption:
        fig.text(0.01, -0.02, caption, fontsize=7, va="top", wrap=True)
    return fig


def plot(rows: list[Row], tasks: list[str], out_dir: Path, split: str = "test", runs: list[Run] = ()) -> list[Path]:
    """The three panels of the paper's Figure 1, as PNG files; the memory panel only where its figures compare
    (CUDA, or one process per job), or with a caption that says they do not."""
    import matplotlib.pyplot as plt

    plot_memory, note = memory_note(list(runs))
    written = []
    for key, label, name in PLOTS:
        if key == MEMORY_KEY and not plot_memory:
            continue
        caption = note[0].upper() + note[1:] + "." if note and key == MEMORY_KEY else None
        fig = figure(rows, tasks, key, label, split, caption)
        if fig is None:
            continue
        fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(out_dir / name)
    return written


@dataclass
class Summary:
    markdown: str
    files: list[Path]


def summarise(sweep_dir: Path, split: str = "test", out_dir: Path | None = None) -> Summary:
    """Write summary.md, summary.csv, runs.csv and the plots into the sweep folder (or `out_dir`)."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir or sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = load_runs(sweep_dir, split)
    manifest = read_manifest(sweep_dir)
    parts = sort_runs(runs, manifest)
    rows, tasks = aggregate(parts.counted, list(manifest.get("jobs", {})))
    _, memory = memory_note(parts.counted)
    markdown = to_markdown(rows, tasks, parts, sweep_dir, split, memory)
    files = [out_dir / "summary.md", out_dir / "summary.csv", out_dir / "runs.csv"]
    files[0].write_text(markdown)
    write_csv(rows, tasks, files[1])
    write_runs_csv(runs, roles(parts), files[2])
    for stale in (out_dir / name for _, _, name in PLOTS):  # a plot left out now must not stay from before
        stale.unlink(missing_ok=True)
    if rows:
        files += plot(rows, tasks, out_dir, split, parts.counted)
    return Summary(markdown, files)
