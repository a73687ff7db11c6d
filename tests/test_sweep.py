"""sweep.py: the grids' jobs, job files equal to the command line, resume, failures, and the summary."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from smop.summary import routing_specialisation, summarise
from smop.sweeps import (
    CONFIG_DIR,
    DEPT_GLUE,
    DEPT_MRQA,
    DEPT_SUPERGLUE,
    FPT_TASKS,
    GRIDS,
    JOB_GROUP,
    JOBS_DIR,
    Grid,
    SweepError,
    check_extra,
    check_jobs,
    check_launcher,
    job_yaml,
    launch,
)

ROOT = Path(__file__).resolve().parents[1]


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "sweep.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ.copy(),
        timeout=300,
    )


# --- grids ----------------------------------------------------------------------------------------------
def test_grid_sizes():
    assert len(GRIDS["table1"].jobs()) == 4 * 6 * 3
    assert len(GRIDS["table2"].jobs(seeds=[0], datasets=["cb"])) == 4 + 4 * 4
    assert len(GRIDS["table3"].jobs()) == 6 * 3 * 3
    assert len(GRIDS["demo"].jobs()) == 4 * 3
    names = [job.name for grid in GRIDS.values() for job in grid.jobs()]
    assert all(name.replace("-", "").replace("_", "").isalnum() for name in names)  # valid config names
    assert all(len(set(n for n in (j.name for j in g.jobs()))) == len(g.jobs()) for g in GRIDS.values())


def test_list_prints_the_jobs_without_running_them(tmp_path):
    out = sweep("table1", "--list", "--seeds", "0,1", "--sweep-dir", str(tmp_path), "model=t5-base")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == 4 * 6 * 2
    assert lines[0].split()[:2] == ["pt100-boolq-s0", "pending"]
    assert "method=prompt_tuning method.prompt_length=100 dataset=boolq seed=0 model=t5-base" in lines[0]
    assert any(line.startswith("smop4x5-wic-s1 ") for line in lines)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("grid", "tasks"), [("dept_glue", DEPT_GLUE), ("dept_superglue", DEPT_SUPERGLUE), ("dept_mrqa", DEPT_MRQA)]
)
def test_dept_grids_list_their_tasks_and_every_job_composes(grid, tasks, tmp_path):
    out = sweep(grid, "--list", "--seeds", "0", "--sweep-dir", str(tmp_path / "listed"))
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines() if not line.startswith("#")]
    assert [line[0] for line in lines] == [f"dept-{task}-s0" for task in tasks]
    assert lines[0][2:] == ["python", "train.py", f"experiment={grid}", f"dataset={tasks[0]}", "seed=0"]
    jobs = GRIDS[grid].jobs(seeds=[0])
    (tmp_path / JOB_GROUP).mkdir()
    for job in jobs:
        (tmp_path / JOB_GROUP / f"{job.name}.yaml").write_text(job_yaml(job, grid))
    GlobalHydra.instance().clear()
    assert check_jobs(jobs, tmp_path, []) == {}


def test_fpt_grid_runs_each_task_with_its_own_experiment_and_seed_2022(tmp_path):
    out = sweep("fpt", "--list", "--sweep-dir", str(tmp_path / "listed"))
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines() if not line.startswith("#")]
    assert [line[0] for line in lines] == [f"fpt-{task}-s2022" for task in FPT_TASKS]
    for line, task in zip(lines, FPT_TASKS, strict=True):
        assert line[2:] == ["python", "train.py", f"experiment=fpt_{task}", f"dataset={task}", "seed=2022"]
    jobs = GRIDS["fpt"].jobs()
    (tmp_path / JOB_GROUP).mkdir()
    for job in jobs:
        (tmp_path / JOB_GROUP / f"{job.name}.yaml").write_text(job_yaml(job, "fpt"))
    GlobalHydra.instance().clear()
    assert check_jobs(jobs, tmp_path, []) == {}
    with pytest.raises(SweepError):
        check_extra(GRIDS["fpt"], ["experiment=fpt_mnli"])  # a per-job key


# one job of each kind: every method of table 1, PT and SMoP shapes, a router and the single router, the demo
KINDS = {
    "table1": ["pt100-cb-s0", "ptuning100-cb-s0", "smop4x5-cb-s0", "full-cb-s0"],
    "table2": ["pt5-cb-s0", "smop10x3-cb-s0"],
    "table3": ["smop-top2-cb-s0", "smop-single-cb-s0"],
    "demo": ["smop2x5-synthetic_mixture-s0"],
    "dept_glue": ["dept-cb-s0"],
    "dept_superglue": ["dept-cb-s0"],
}


def test_job_files_compose_like_the_command_line(tmp_path):
    """The multirun runs each job from its job file; it must be the config `python train.py <overrides>` runs."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for grid, names in KINDS.items():
            jobs = {job.name: job for job in GRIDS[grid].jobs(datasets=["cb"] if grid != "demo" else None)}
            jobs_dir = tmp_path / grid / JOBS_DIR
            (jobs_dir / JOB_GROUP).mkdir(parents=True)
            for name in names:
                (jobs_dir / JOB_GROUP / f"{name}.yaml").write_text(job_yaml(jobs[name], grid))
                direct = compose("train.yaml", overrides=list(jobs[name].overrides))
                via_file = compose(
                    "train.yaml", overrides=[f"hydra.searchpath=[file://{jobs_dir}]", f"+{JOB_GROUP}={name}"]
                )
                assert OmegaConf.to_container(via_file) == OmegaConf.to_container(direct), name
                if "router=single" in jobs[name].overrides:  # single fixes K=1 through interpolation
                    assert via_file.method.num_prompts == 1


def test_jobs_are_checked_before_launching(tmp_path):
    """Jobs that would stop the multirun or fail train.py's checks are found without running anything."""
    grid = Grid(
        "check",
        "",
        (
            ("ok", ("method=smop",)),
            ("bad", ("method=no_such_method",)),
            ("long", ("method=prompt_tuning", "method.prompt_length=600")),
            ("empty", ("method=smop", "method.prompt_length=0")),  # would train empty prompts and say completed
        ),
        datasets=("cb",),
        seeds=(0, 1),
    )
    (tmp_path / JOB_GROUP).mkdir()
    for job in grid.jobs():
        (tmp_path / JOB_GROUP / f"{job.name}.yaml").write_text(job_yaml(job, grid.name))
    GlobalHydra.instance().clear()
    errors = check_jobs(grid.jobs(), tmp_path, ["model=t5-tiny"])
    assert sorted(errors) == ["bad-cb-s0", "bad-cb-s1", "empty-cb-s0", "empty-cb-s1", "long-cb-s0", "long-cb-s1"]
    assert "no_such_method" in errors["bad-cb-s1"] and "method.prompt_length" in errors["long-cb-s1"]
    assert "method.prompt_length=0 is out of range: must be an integer >= 1" in errors["empty-cb-s1"]


@pytest.mark.parametrize(
    "override", ["dataset=cb", "seed=3", "method.prompt_length=20", "model=t5-base,t5-large", "hydra.sweep.dir=/tmp/x"]
)
def test_overrides_the_grid_owns_are_refused(override):
    with pytest.raises(SweepError):
        check_extra(GRIDS["table1"], [override])


def test_overrides_for_every_job_pass():
    check_extra(
        GRIDS["table1"],
        [
            "model=t5-base",
            "trainer=gpu",
            "dataset.source=hub",
            "hydra/launcher=basic",
            "method.lr=0.3",
            "dataset.label_words=[a,b]",
        ],
    )
    check_extra(GRIDS["demo"], ["trainer.max_epochs=2"])  # a grid's fixed overrides may be overridden


def test_a_missing_launcher_plugin_is_named():
    GlobalHydra.instance().clear()
    with pytest.raises(SweepError, match="pip install hydra-submitit-launcher"):
        check_launcher(["hydra/launcher=submitit_not_installed"])


# --- summary --------------------------------------------------------------------------------------------
def test_routing_specialisation():
    assert routing_specialisation([50, 50]) == (1.0, 0.5)
    assert routing_specialisation([0, 40, 0, 0]) == (0.0, 1.0)
    entropy, share = routing_specialisation([30, 10])
    assert entropy == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2))
    assert share == 0.75
    assert routing_specialisation(None) == (None, None)


def _results(method: str, dataset: str, seed: int, accuracy: float, status: str = "completed", **extra) -> dict:
    routed = method == "smop"
    test = {"accuracy": accuracy, "score": accuracy} if status == "completed" else None
    return {
        "method": method,
        "router": "top1_perturbed" if routed else None,
        "dataset": dataset,
        "model": "tiny",
        "seed": seed,
        "params": {"trainable": 1536 if routed else 640, "total": 10},
        "metrics": {"val": None, "test": test, "best_epoch": 1},
        "cost": {
            "train_time_s": 10.0 + seed,
            "peak_memory_bytes": 2**30,
            "memory_kind": "cpu_peak_rss",
            "inference_flops_per_example": 5e6,
        },
        "routing": {"counts": {"test": [30, 10]} if routed else {}},
        "config": {"method": {"name": method, "prompt_length": 5, **({"num_prompts": 2} if routed else {})}},
        "status": status,
        **extra,
    }


def test_summary_tables_and_plots(tmp_path):
    for method in ("prompt_tuning", "smop"):
        for dataset in ("rte", "cb"):
            for seed in (0, 1):
                accuracy = {"prompt_tuning": 0.5, "smop": 0.8}[method] + 0.1 * seed + (0.05 if dataset == "cb" else 0)
                job = tmp_path / f"{method}-{dataset}-s{seed}"
                job.mkdir()
                (job / "results.json").write_text(json.dumps(_results(method, dataset, seed, accuracy)))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text(
        json.dumps(_results("smop", "rte", 2, 0.0, status="failed", error="RuntimeError: out of memory"))
    )
    (tmp_path / "_attempts" / "old").mkdir(parents=True)  # earlier attempts are not counted
    (tmp_path / "_attempts" / "old" / "results.json").write_text(json.dumps(_results("smop", "rte", 9, 0.1)))
    (tmp_path / "sweep.json").write_text(json.dumps({"jobs": {"never-ran": {"status": "failed", "error": "bad"}}}))

    summary = summarise(tmp_path)
    names = {p.name for p in summary.files}
    assert {
        "summary.md",
        "summary.csv",
        "runs.csv",
        "score_vs_train_time.png",
        "score_vs_memory.png",
        "score_vs_inference_flops.png",
    } <= names
    assert all(p.stat().st_size > 0 for p in summary.files)
    table = [line for line in summary.markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| config | cb | rte | avg | train time (s) |")  # tasks in the paper's order
    assert table[1].startswith("| prompt_tuning L=5 | 60.0 ± 7.1 | 55.0 ± 7.1 | 57.5 ± 7.1 | 10.5 |")
    assert table[2].startswith("| smop 2x5 (top1_perturbed) | 90.0 ± 7.1 | 85.0 ± 7.1 | 87.5 ± 7.1 |")
    assert "| 0.81 | 0.75 | 4 |" in table[2]  # routing entropy, top share, runs
    assert "`broken`: RuntimeError: out of memory" in summary.markdown
    assert "`never-ran`: bad" in summary.markdown
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["config"] for r in rows] == ["prompt_tuning L=5", "smop 2x5 (top1_perturbed)"]
    assert float(rows[1]["avg"]) == pytest.approx(87.5)
    assert float(rows[1]["rte_std"]) == pytest.approx(math.sqrt(0.5 * 10**2))
    assert rows[1]["trainable_params"] == "1536" and rows[0]["routing_entropy"] == ""
    runs = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert len(runs) == 9 and sum(r["status"] == "failed" for r in runs) == 1
    assert {r["path"]: r["role"] for r in runs}["broken"] == "failed run"


def _write(folder: Path, results: dict, hydra_mode: str | None = None, launcher: str = "BasicLauncher") -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    if hydra_mode is not None:  # what Hydra records of how the job ran
        (folder / ".hydra").mkdir()
        hydra = {"hydra": {"mode": hydra_mode, "launcher": {"_target_": f"hydra.plugins.{launcher}"}}}
        (folder / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml(hydra))


def test_summary_counts_training_runs_only(tmp_path):
    """A config error is a failed job, not a run; a train=false re-evaluation and a repeated seed are no seeds."""
    for seed, accuracy in ((0, 0.6), (1, 0.8)):
        _write(tmp_path / f"smop-s{seed}", _results("smop", "rte", seed, accuracy))
    config_error = _results("smop", "rte", 2, 0.0, status="failed", error="ValueError: method.prompt_length=0 is out")
    _write(tmp_path / "bad-s2", {**config_error, "params": None, "cost": {}})
    reevaluation = _results("smop", "rte", 0, 0.9)
    reevaluation["config"]["train"] = False
    _write(tmp_path / "smop-s0-eval", reevaluation)
    _write(tmp_path / "smop-s1-again", _results("smop", "rte", 1, 0.2))  # the same seed trained twice

    summary = summarise(tmp_path)
    row = next(line for line in summary.markdown.splitlines() if line.startswith("| smop 2x5"))
    assert row.startswith("| smop 2x5 (top1_perturbed) | 70.0 ± 14.1 |") and row.endswith("| 2 |")  # seeds 0, 1
    assert "2 runs in the table, 0 failed runs, 1 failed jobs (stopped before training: not runs)" in summary.markdown
    assert "1 train=false re-evaluations (not counted), 1 repeated seeds (not counted)" in summary.markdown
    sections = summary.markdown.split("\n## ")
    failed_jobs = next(s for s in sections if s.startswith("Failed jobs"))
    assert "`bad-s2`: ValueError: method.prompt_length=0 is out" in failed_jobs
    assert not any(s.startswith("Failed runs") for s in sections)
    assert "`smop-s0-eval`" in next(s for s in sections if s.startswith("Re-evaluations"))
    assert "`smop-s1-again`" in next(s for s in sections if s.startswith("Repeated seeds"))
    roles = {r["path"]: r["role"] for r in csv.DictReader((tmp_path / "runs.csv").open())}
    assert roles == {
        "bad-s2": "failed job",
        "smop-s0": "run",
        "smop-s0-eval": "re-evaluation",
        "smop-s1": "run",
        "smop-s1-again": "repeated seed",
    }
    assert next(csv.DictReader((tmp_path / "summary.csv").open()))["rte_seeds"] == "2"


def _rows(tmp_path: Path, cost: dict | None = None, **hydra) -> tuple[list, list[str], list]:
    """Rows of a small synthetic sweep: PT-5 and SMoP 2x5 at the same FLOPs, PT-20 at more; scores near 100."""
    from smop.summary import aggregate, load_runs

    accuracies = {("prompt_tuning", 5): (0.3, 0.7), ("prompt_tuning", 20): (0.99, 1.0), ("smop", 5): (1.0, 0.6)}
    for (method, length), scores in accuracies.items():
        for seed, accuracy in enumerate(scores):
            results = _results(method, "rte", seed, accuracy)
            results["config"]["method"]["prompt_length"] = length
            results["cost"].update({"inference_flops_per_example": 4.87e6 if length == 5 else 7.6e6, **(cost or {})})
            _write(tmp_path / f"{method}{length}-s{seed}", results, **hydra)
    runs = load_runs(tmp_path)
    rows, tasks = aggregate(runs)
    return rows, tasks, runs


def _display_x(container, ax) -> float:
    line = container.lines[0]
    return float(line.get_transform().transform(line.get_xydata())[0][0])


def test_plot_markers_at_the_same_x_do_not_hide_each_other(tmp_path):
    from smop.summary import figure

    rows, tasks, _ = _rows(tmp_path)
    fig = figure(rows, tasks, "inference_flops_per_example", "FLOPs")
    ax = fig.axes[0]
    fig.canvas.draw()
    x = {c.get_label(): _display_x(c, ax) for c in ax.containers}
    same = (x["prompt_tuning L=5"], x["smop 2x5 (top1_perturbed)"])
    assert abs(same[0] - same[1]) >= 5  # pixels apart, though their FLOPs are equal
    data = {c.get_label(): c.lines[0].get_xdata()[0] for c in ax.containers}
    assert data["prompt_tuning L=5"] == data["smop 2x5 (top1_perturbed)"] == 4.87e6  # the data keep their true x
    markers = {c.lines[0].get_marker() for c in ax.containers}
    assert len(markers) == 3


def test_plot_flop_axis_in_si_units_and_error_bars_within_the_score_range(tmp_path):
    from smop.summary import figure

    rows, tasks, _ = _rows(tmp_path)
    fig = figure(rows, tasks, "inference_flops_per_example", "FLOPs")
    ax = fig.axes[0]
    fig.canvas.draw()
    formatter = ax.xaxis.get_major_formatter()
    assert formatter(5e6, 0) == "5 M" and formatter(2e9, 0) == "2 G"
    assert ax.xaxis.get_offset_text().get_text() == ""  # no 1e6 offset
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(label.endswith(" M") for label in labels)
    for container in ax.containers:
        for segments in (bars.get_segments() for bars in container.lines[2]):
            for segment in segments:
                assert segment[:, 1].min() >= 0.0 and segment[:, 1].max() <= 100.0
    pt20 = next(c for c in ax.containers if c.get_label() == "prompt_tuning L=20")
    top = max(segment[:, 1].max() for bars in pt20.lines[2] for segment in bars.get_segments())
    assert top == pytest.approx(100.0)  # 99.5 ± 0.7 would reach 100.2: cut at 100


def test_memory_plot_only_where_the_figures_compare(tmp_path):
    from smop.summary import memory_note, plot

    def files(folder: Path, **options) -> tuple[set[str], str | None]:
        rows, tasks, runs = _rows(folder, **options)
        written = {p.name for p in plot(rows, tasks, folder, runs=runs)}
        return written, memory_note(runs)[1]

    names, note = files(tmp_path / "cuda", cost={"memory_kind": "cuda_max_allocated"}, hydra_mode="MULTIRUN")
    assert "score_vs_memory.png" in names and note is None  # reset per run
    names, note = files(tmp_path / "own-processes", hydra_mode="RUN")  # cpu_peak_rss, one python train.py each
    assert "score_vs_memory.png" in names and note is None
    names, note = files(tmp_path / "submitit", hydra_mode="MULTIRUN", launcher="submitit_launcher.LocalLauncher")
    assert note is None
    names, note = files(tmp_path / "shared", hydra_mode="MULTIRUN")  # the basic launcher: one process for all
    assert "score_vs_memory.png" in names and "jobs shared a process" in note and "do not compare" in note

    from smop.summary import figure

    rows, tasks, runs = _rows(tmp_path / "shared-figure", hydra_mode="MULTIRUN")
    fig = figure(rows, tasks, "peak_memory_bytes", "memory", caption="Not comparable.")
    assert [t.get_text() for t in fig.texts] == ["Not comparable."]

    mixed = tmp_path / "mixed"
    rows, tasks, runs = _rows(mixed, hydra_mode="RUN")
    gpu = _results("smop", "cb", 0, 0.5)
    gpu["cost"]["memory_kind"] = "cuda_max_allocated"
    _write(mixed / "gpu-run", gpu, hydra_mode="RUN")
    summary = summarise(mixed)
    assert "score_vs_memory.png" not in {p.name for p in summary.files}
    assert not (mixed / "score_vs_memory.png").exists()  # the one written above is not left behind
    assert "which do not compare: no memory plot" in summary.markdown


# --- end to end: multiruns of train.py as subprocesses ----------------------------------------------------
@pytest.mark.slow
def test_sweep_runs_resumes_and_summarises(tmp_path):
    out = sweep("smoke", "--sweep-dir", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = ["pt5-synthetic_mixture-s0", "smop2x5-synthetic_mixture-s0"]
    stamps = {}
    for job in jobs:
        results = json.loads((tmp_path / job / "results.json").read_text())
        assert results["status"] == "completed" and results["seed"] == 0
        assert results["config"]["trainer"]["max_epochs"] == 1
        stamps[job] = (tmp_path / job / "results.json").stat().st_mtime_ns
    assert json.loads((tmp_path / "smop2x5-synthetic_mixture-s0" / "results.json").read_text())["method"] == "smop"

    again = sweep("smoke", "--sweep-dir", str(tmp_path))  # resume: nothing left to run
    assert again.returncode == 0, again.stderr
    assert "0 completed now, 2 skipped" in again.stdout
    assert "Launching" not in again.stdout
    assert all((tmp_path / job / "results.json").stat().st_mtime_ns == stamps[job] for job in jobs)
    listed = sweep("smoke", "--list", "--sweep-dir", str(tmp_path)).stdout
    assert listed.count(" completed ") == 2

    summary = sweep("summary", str(tmp_path))
    assert summary.returncode == 0, summary.stderr
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["config"] for r in rows] == ["prompt_tuning L=5", "smop 2x5 (top1_perturbed)"]
    assert all(float(r["train_time_s"]) > 0 and float(r["inference_flops_per_example"]) > 0 for r in rows)
    assert rows[1]["routing_max_share"] != ""
    assert len(list(tmp_path.glob("*.png"))) == 3


@pytest.mark.slow
def test_failing_jobs_do_not_stop_the_others(tmp_path):
    grid = Grid(
        "failing",
        "one job that composes wrong, one that crashes, one that runs",
        (
            ("bad", ("method=no_such_method",)),  # does not compose: left out of the multirun
            ("crash", ("method=prompt_tuning", "method.prompt_length=5", "trainer.accelerator=no_such_device")),
            ("ok", ("method=prompt_tuning", "method.prompt_length=5")),
        ),
        datasets=("synthetic_mixture",),
        seeds=(0,),
        fixed=GRIDS["smoke"].fixed,
        env=GRIDS["smoke"].env,
    )
    GlobalHydra.instance().clear()
    report = launch(grid, grid.jobs(), tmp_path)
    assert report.completed == ["ok-synthetic_mixture-s0"]
    assert set(report.failed) == {"bad-synthetic_mixture-s0", "crash-synthetic_mixture-s0"}
    assert "no_such_method" in report.failed["bad-synthetic_mixture-s0"]
    assert "no_such_device" in report.failed["crash-synthetic_mixture-s0"]  # the reason, from its results.json
    crashed = json.loads(next(tmp_path.glob("crash-*/results.json")).read_text())
    assert crashed["status"] == "failed"
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert {name: job["status"] for name, job in manifest["jobs"].items()} == {
        "bad-synthetic_mixture-s0": "failed",
        "crash-synthetic_mixture-s0": "failed",
        "ok-synthetic_mixture-s0": "completed",
    }
    markdown = summarise(tmp_path).markdown
    failed_jobs = markdown.split("## Failed jobs (stopped before training: not runs)")[1]
    assert "`bad-synthetic_mixture-s0`" in failed_jobs and "`crash-synthetic_mixture-s0`" in failed_jobs
    assert "1 runs in the table, 0 failed runs, 2 failed jobs" in markdown
    assert "| prompt_tuning L=5 |" in markdown


@pytest.mark.slow
def test_summary_of_real_runs_keeps_config_errors_and_reevaluations_out(tmp_path):
    """train.py as a user runs it: one run, one config error, one train=false re-evaluation, all in one folder."""
    short = ["dataset=synthetic_mixture", "dataset.synthetic.num_train=64", "dataset.synthetic.num_test=16"]
    short += ["trainer.max_epochs=1", "callbacks.flop_counter=null", "callbacks.progress_bar=null", "seed=0"]

    def train(*overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / "train.py"), *short, *overrides]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=300)

    assert train(f"hydra.run.dir={tmp_path / 'run'}").returncode == 0
    assert train("method.prompt_length=0", f"hydra.run.dir={tmp_path / 'typo'}").returncode != 0
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    again = train("train=false", f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["status"] == "completed"

    out = sweep("summary", str(tmp_path))
    assert out.returncode == 0, out.stderr
    markdown = (tmp_path / "summary.md").read_text()
    assert (
        "1 runs in the table, 0 failed runs, 1 failed jobs" in markdown and "1 train=false re-evaluations" in markdown
    )
    table = [line for line in markdown.splitlines() if line.startswith("| smop")]
    assert len(table) == 1 and table[0].endswith("| 1 |")  # one seed: the re-evaluation is not a second one
    assert "- `typo`: ValueError: method.prompt_length=0 is out of range" in markdown
    assert "- `eval`: smop 4x5 (top1_perturbed) on synthetic_mixture, seed 0" in markdown
