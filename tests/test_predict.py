"""smop.predict on a malformed input: what comes before the bad line is written, the message is `FILE:LINE: reason`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from helpers import SYNTHETIC

import smop.run
from smop.data.synthetic import synthetic_mixture
from smop.loading import load
from smop.predict import BadInputLine, predict_file

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "test=false"]
SHORT += ["callbacks.flop_counter=null", "callbacks.progress_bar=null", "logger=[]"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict")
    cfg = compose_config(["method=prompt_tuning", "method.prompt_length=4", *SYNTHETIC, *SHORT], out)
    assert smop.run.run(cfg)["status"] == "completed"
    return next((out / "checkpoints").glob("best-*.ckpt"))


def inputs(count: int) -> list[str]:
    return [json.dumps({"text": record["text"]}) for record in synthetic_mixture(count, seed=3)]


def test_a_bad_line_in_the_first_batch_keeps_the_lines_before_it(checkpoint, tmp_path):
    loaded = load(checkpoint, device="cpu")
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(inputs(5)) + "\n")
    predict_file(loaded, good, tmp_path / "good.out.jsonl", batch_size=32, progress=False)
    expected = (tmp_path / "good.out.jsonl").read_text().splitlines()

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(inputs(3)) + '\n{"sentence": "no text field"}\n' + "\n".join(inputs(5)[3:]) + "\n")
    with pytest.raises(BadInputLine, match=rf"^{bad}:4: malformed synthetic_mixture input: missing field"):
        predict_file(loaded, bad, tmp_path / "bad.out.jsonl", batch_size=32, progress=False)
    assert (tmp_path / "bad.out.jsonl").read_text().splitlines() == expected[:3]  # lines 1-3, as labelled alone


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_every_line_before_the_bad_one_is_written_whatever_the_batch(checkpoint, tmp_path, batch_size):
    bad = tmp_path / "in.jsonl"
    bad.write_text("\n".join(inputs(5)) + "\n{broken\n")
    with pytest.raises(BadInputLine, match=r"in.jsonl:6: not valid JSON \("):
        predict_file(load(checkpoint, device="cpu"), bad, tmp_path / "out.jsonl", batch_size, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["idx"] for line in lines] == [0, 1, 2, 3, 4]


def test_predict_cli_reports_file_and_line_plainly(checkpoint, tmp_path):
    """python -m smop.predict, as a user runs it: a bad third line in the first batch."""
    source = tmp_path / "new.jsonl"
    source.write_text("\n".join(inputs(2)) + '\n{"text": }\n' + inputs(1)[0] + "\n")
    command = [sys.executable, "-m", "smop.predict", f"prompt={checkpoint}", f"input={source}", "device=cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"smop.predict: {source}:3: not valid JSON (Expecting value at column 10)"), message
    assert "line 1 column" not in message and "char" not in message  # json's own position within the line, once
    assert "Traceback" not in done.stderr
    written = [json.loads(line) for line in (tmp_path / "new.predictions.jsonl").read_text().splitlines()]
    assert [line["idx"] for line in written] == [0, 1]


@pytest.fixture(scope="module")
def causal_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict_causal")
    overrides = ["model=llama-tiny", "method=prompt_tuning", "method.prompt_length=4", *SYNTHETIC, *SHORT]
    assert smop.run.run(compose_config(overrides, out))["status"] == "completed"
    return next((out / "checkpoints").glob("best-*.ckpt"))


def test_sampled_predictions_give_every_output_and_its_label(causal_checkpoint, tmp_path):
    import torch

    from smop.backbones.decoding import Decoding
    from smop.metrics import to_label_index

    loaded = load(causal_checkpoint, device="cpu")
    examples = [{"text": record["text"]} for record in synthetic_mixture(3, seed=3)]
    greedy = loaded.generate(examples)
    assert [len(texts) for texts in greedy] == [1, 1, 1]
    assert to_label_index([texts[0] for texts in greedy], loaded.task.label_words).tolist() == loaded.label(examples)

    decoding = Decoding(do_sample=True, temperature=2.0, num_return_sequences=4)
    first = loaded.generate(examples, decoding, torch.Generator().manual_seed(0))
    again = loaded.generate(examples, decoding, torch.Generator().manual_seed(0))
    assert first == again and [len(texts) for texts in first] == [4, 4, 4]
    assert len({text for texts in first for text in texts}) > 1  # temperature 2 on random weights: outputs differ

    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(inputs(3)) + "\n")
    predict_file(loaded, source, tmp_path / "out.jsonl", batch_size=2, progress=False, decoding=decoding)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [len(line["outputs"]) for line in lines] == [4, 4, 4]
    words = loaded.task.label_words
    for line in lines:
        assert line["label_indices"] == to_label_index(line["outputs"], words).tolist()
        assert line["labels"] == [words[i] if i >= 0 else None for i in line["label_indices"]]


def test_predict_cli_refuses_a_bad_decoding_option_before_loading(tmp_path):
    command = [sys.executable, "-m", "smop.predict", f"prompt={tmp_path}/none", f"input={tmp_path}/none.jsonl"]
    done = subprocess.run(
        [*command, "decoding.num_return_sequences=3"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 1
    assert "decoding.num_return_sequences=3 needs do_sample=true" in done.stderr
