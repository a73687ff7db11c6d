"""What `python train.py` prints: each log line once, and no Lightning figure that contradicts our own."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

from smop.logs import PrintedElsewhere

SHORT = ["dataset=synthetic_mixture", "dataset.synthetic.num_train=64", "dataset.synthetic.num_test=16"]
SHORT += ["trainer.max_epochs=1", "~callbacks.flop_counter"]
LOG_LINE = re.compile(r"^\[[^\]]+\]\[(?P<name>[^\]]+)\]\[(?P<level>[A-Z]+)\] - (?P<message>.*)$")


def test_each_log_line_is_printed_once_and_lightning_prints_no_zero_flops(tmp_path):
    command = [sys.executable, "train.py", *SHORT, f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    terminal = done.stdout + done.stderr
    logged = [LOG_LINE.match(line) for line in (tmp_path / "train.log").read_text().splitlines()]
    messages = [m["message"] for m in logged if m]
    assert any(m["name"].startswith("lightning") for m in logged if m)  # Lightning's lines reach the log file
    for message in set(messages):  # as often on the terminal as in the log (some, like checkpoint loads, recur)
        assert terminal.count(message) == messages.count(message), message
    assert "Total FLOPs" not in terminal  # Lightning's summary said 0 next to our own figure


def test_the_filter_passes_what_no_other_console_handler_printed():
    import logging

    record = logging.LogRecord("smop.run", logging.INFO, __file__, 1, "ours", None, None)
    assert PrintedElsewhere().filter(record)
    library = logging.getLogger("some_library_with_its_own_handler")
    handler = logging.StreamHandler()
    library.addHandler(handler)
    try:
        record = logging.LogRecord(f"{library.name}.sub", logging.INFO, __file__, 1, "theirs", None, None)
        assert not PrintedElsewhere().filter(record)
        handler.setLevel(logging.WARNING)  # their handler would not print an INFO line: ours must
        assert PrintedElsewhere().filter(record)
    finally:
        library.removeHandler(handler)
