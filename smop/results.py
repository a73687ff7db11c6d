"""The run contract: results.json in every run's output directory, and the summary printed at the end."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS_FILE = "results.json"
METRIC_SPLITS = ("val", "test", "test_alt")  # results.json's metrics; test_alt: a second test set (MNLI mismatched)


def versions() -> dict[str, str | None]:
    import lightning
    import torch
    import transformers

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "git_commit": commit,
    }


def write_results(output_dir: str | Path, results: dict[str, Any]) -> Path:
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float))
    return path


def print_summary(results: dict[str, Any], console: Console | None = None) -> None:
    """One table: what ran, its scores, what it cost."""
    table = Table(
        title=f"{results['method']} ({results.get('router') or 'no router'}) on {results['dataset']}"
        f" - {results['model']} - seed {results['seed']} - {results['status']}"
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for split in METRIC_SPLITS:
        for name, value in (results["metrics"].get(split) or {}).items():
            table.add_row(f"{split}/{name}", f"{value:.4f}")
    metrics = results["metrics"]
    table.add_row("best epoch / step", f"{metrics.get('best_epoch')} / {metrics.get('best_step')}")
    params = results["params"]
    table.add_row("trainable / total params", f"{params['trainable']:,} / {params['total']:,}")
    for name, value in (results.get("cost") or {}).items():
        if isinstance(value, dict):  # cost.hardware: one row per field
            for key, inner in value.items():
                table.add_row(f"{name}.{key}", f"{inner:,.4g}" if isinstance(inner, int | float) else str(inner))
        elif name.endswith("_note"):  # the reasons behind a figure: results.json keeps them in full
            continue
        else:
            table.add_row(name, f"{value:,.4g}" if isinstance(value, int | float) else str(value))
    for split, counts in (results.get("routing", {}).get("counts") or {}).items():
        table.add_row(f"routing/{split}", str(counts))
    (console or Console()).print(table)
