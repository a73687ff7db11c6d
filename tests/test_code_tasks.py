"""Code tasks (MBPP, CRUXEval-O/I as the LoPA reference runs them): the bundled samples are correct programs, the real
files parse and split as the reference's halves (and MBPP's official ranges), the CRUXEval prompt is the reference's
text, targets and left truncation, the decoding options and the refusals, and a tiny run that trains, samples and
scores its test generations into results.json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, compose_config
from helpers import task_datamodule

import smop.code.evaluation
from smop.checks import check_config
from smop.data.datamodule import keep_end
from smop.data.sources import read_records, sample_dir
from smop.run import run
from smop.sweeps import GRIDS

FIXTURES = ROOT.parent / "shared" / "fixtures"
MBPP_FILE, CRUXEVAL_FILE = FIXTURES / "mbpp" / "mbpp_release_v1.jsonl", FIXTURES / "cruxeval" / "cruxeval.jsonl"
needs_fixtures = pytest.mark.skipif(
    not (MBPP_FILE.is_file() and CRUXEVAL_FILE.is_file()),
    reason=f"the real MBPP and CRUXEval files are not at {FIXTURES} (../shared/fixtures)",
)
TINY = ["model=llama-tiny", "dataset.source=sample", "method=prompt_tuning", "method.prompt_length=4"]
TINY += ["optimizer=adamw", "method.lr=1e-3", "dataset.max_target_length=48", "callbacks.progress_bar=null"]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def runs(program: str) -> bool:
    return (
        subprocess.run([sys.executable, "-"], input=program.encode(), capture_output=True, timeout=60).returncode == 0
    )


# --- the bundled samples --------------------------------------------------------------------------------------------


def test_every_mbpp_sample_solution_passes_its_check():
    rows = lines(sample_dir("mbpp") / "mbpp_release_v1.jsonl")
    assert len(rows) >= 80 and [r["task_id"] for r in rows] == [f"MBPP/{i}" for i in range(1, len(rows) + 1)]
    program = "\n".join(
        f"def _{i}():\n    ns = {{}}\n    exec({r['prompt'] + r['canonical_solution'] + r['test']!r}, ns)\n"
        f"    ns['check'](ns[{r['entry_point']!r}])\n_{i}()"
        for i, r in enumerate(rows)
    )
    assert runs(program)
    wrong = rows[0]["prompt"] + "\treturn None\n" + rows[0]["test"] + f"\ncheck({rows[0]['entry_point']})\n"
    assert not runs(wrong)  # the checks do check


def test_every_cruxeval_sample_satisfies_f_of_input_equals_output():
    rows = lines(sample_dir("cruxeval") / "cruxeval.jsonl")
    assert len(rows) >= 80 and {"code", "input", "output", "id"} <= set(rows[0])
    program = "\n".join(
        f"def _{i}():\n    ns = {{}}\n    exec({r['code']!r}, ns)\n    assert eval({r['output']!r}) == "
        f"eval('f(' + {r['input']!r} + ')', ns)\n_{i}()"
        for i, r in enumerate(rows)
    )
    assert runs(program)


@pytest.mark.parametrize("task", ["mbpp", "cruxeval_o", "cruxeval_i"])
def test_samples_split_by_the_reference_halves_with_enough_rows(task):
    datamodule = task_datamodule(task, causal=True, prompt_length=10)
    datamodule.setup()
    records = datamodule.split_info["records"]
    assert records["train"] >= 60 and records["test"] >= 20 and records["val"] == 0
    assert records["train"] == records["test"] and not datamodule.validates
    assert datamodule.split_info["protocol"] == "lopa"


# --- the real files (dir source) --------------------------------------------------------------------------------------


@needs_fixtures
def test_mbpp_file_splits_as_the_reference_and_as_mbpp_officially():
    datamodule = task_datamodule("mbpp", source="dir", data_dir=str(MBPP_FILE.parent), causal=True, prompt_length=10)
    datamodule.setup()
    assert datamodule.split_info["records"] == {"train": 487, "val": 0, "test": 487}
    train, test = ([row["problem"]["task_id"] for row in datamodule.splits[s]] for s in ("train", "test"))
    assert train[0] == "MBPP/1" and train[-1] == "MBPP/487" and test[0] == "MBPP/488" and test[-1] == "MBPP/974"
    official = task_datamodule("mbpp", source="dir", data_dir=str(MBPP_FILE.parent), split_protocol="official")
    official.setup()
    assert official.split_info["records"] == {"train": 374, "val": 90, "test": 500} and official.validates
    assert official.splits["test"][0]["problem"]["task_id"] == "MBPP/11"


@needs_fixtures
@pytest.mark.parametrize("task", ["cruxeval_o", "cruxeval_i"])
def test_cruxeval_file_splits_into_rows_0_399_and_400_799(task):
    datamodule = task_datamodule(task, source="dir", data_dir=str(CRUXEVAL_FILE.parent), causal=True, prompt_length=10)
    datamodule.setup()
    assert datamodule.split_info["records"] == {"train": 400, "val": 0, "test": 400}
    ids = [row["problem"]["id"] for row in datamodule.splits["test"]]
    assert ids[0] == "sample_400" and ids[-1] == "sample_799"
    assert datamodule.splits["train"][-1]["problem"]["id"] == "sample_399"


@needs_fixtures
def test_the_real_mbpp_rows_are_read_whole():
    row = read_records(MBPP_FILE, task_datamodule("mbpp").task)[0]
    assert row["entry_point"] == "min_cost" and row["prompt"].startswith("\n\ndef min_cost(cost, m, n):\n\t")


# --- prompts, targets, truncation ----------------------------------------------------------------------------------

CRUX_ROW = {"code": "def f(x):\n    return x * 2", "input": "3", "output": "6", "id": "sample_0"}
# make_direct_output_prompt of the CRUXEval authors (as the LoPA repository ships it), up to and with [ANSWER]
REFERENCE_O = """You are given a Python function and an assertion containing an input to the function. Complete the \
assertion with a literal (no unsimplified expressions, no function calls) containing the output when executing the \
provided code on the given input, even if the function is incorrect or incomplete. Do NOT output any extra \
information. Provide the full assertion with the correct output in [ANSWER] and [/ANSWER] tags, following the examples.

[PYTHON]
def f(n):
    return n
assert f(17) == ??
[/PYTHON]
[ANSWER]
assert f(17) == 17
[/ANSWER]

[PYTHON]
def f(s):
    return s + "a"
assert f("x9j") == ??
[/PYTHON]
[ANSWER]
assert f("x9j") == "x9ja"
[/ANSWER]

[PYTHON]
def f(x):
    return x * 2
assert f(3) == ??
[/PYTHON]
[ANSWER]"""
REFERENCE_I_END = """[PYTHON]
def f(s1, s2):
    return s1 + s2
assert f(??) == "banana"
[/PYTHON]
[ANSWER]
assert f("ba", "nana") == "banana"
[/ANSWER]

[PYTHON]
def f(x):
    return x * 2
assert f(??) == 6
[/PYTHON]
[ANSWER]"""


def test_cruxeval_prompts_are_the_reference_text_and_targets_the_completed_assertion():
    output, inputs = task_datamodule("cruxeval_o").task, task_datamodule("cruxeval_i").task
    assert output.template.format(**CRUX_ROW) == REFERENCE_O
    assert inputs.template.format(**CRUX_ROW).startswith("You will be given a function f and an output in the form")
    assert inputs.template.format(**CRUX_ROW).endswith(REFERENCE_I_END)
    for task in (output, inputs):
        assert task.target_text(CRUX_ROW) == "\nassert f(3) == 6\n[/ANSWER]\n"
        assert set(task.fields) == {"id", "code", "input", "output"}


def test_mbpp_prompt_is_the_record_as_is_and_target_its_solution_then_eos():
    datamodule = task_datamodule("mbpp", causal=True, prompt_length=10)
    datamodule.setup()
    row, tokenizer = datamodule.splits["train"][0], datamodule.tokenizer
    problem = row["problem"]
    assert tokenizer.decode(row["input_ids"]) == problem["prompt"]  # byte-level: short prompts are whole
    assert row["labels"] == tokenizer(problem["canonical_solution"], add_special_tokens=False).input_ids + [
        tokenizer.eos_token_id
    ]


def test_left_truncation_keeps_the_end_and_a_leading_bos():
    assert keep_end([5, 1, 2, 3, 4], 3, bos_token_id=5) == [5, 3, 4]
    assert keep_end([1, 2, 3, 4], 2, bos_token_id=None) == [3, 4]
    datamodule = task_datamodule("mbpp", causal=True, prompt_length=10, max_length=100 + 10 + 48, max_target_length=48)
    datamodule.setup()
    row = datamodule.splits["test"][0]
    assert len(row["input_ids"]) == 100
    assert datamodule.tokenizer.decode(row["input_ids"]) == row["problem"]["prompt"][-100:]


# --- options and refusals -------------------------------------------------------------------------------------------


def test_decoding_comes_from_the_dataset_config_and_greedy_is_one_override(make_cfg):
    cfg = make_cfg("model=llama-tiny", "dataset=mbpp")
    assert (cfg.dataset.decoding.temperature, cfg.dataset.decoding.top_p, cfg.dataset.decoding.do_sample) == (
        0.6,
        0.95,
        True,
    )
    assert "\ndef" in cfg.dataset.decoding.stop and make_cfg("dataset=cruxeval_o").dataset.decoding.temperature == 0.2
    check_config(make_cfg("model=llama-tiny", "dataset=mbpp", "dataset.decoding.do_sample=false"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset.decoding.temperature=0"], r"dataset.decoding.temperature=0 is out of range: must be a number > 0"),
        (["dataset.decoding.do_sample=false", "dataset.decoding.num_return_sequences=5"], "needs do_sample=true"),
        (["+dataset.decoding.beams=2"], r"dataset.decoding has \['beams'\]"),
        (["dataset.split_protocol=smop"], r"split_protocol=smop for mbpp.*use one of lopa, official"),
        (["dataset=cruxeval_o", "dataset.split_protocol=official"], "no official training split"),
        (["+dataset.k_shot=4"], "has a code target, no classes"),
    ],
)
def test_bad_code_options_are_refused_by_name(make_cfg, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(make_cfg("model=llama-tiny", "dataset=mbpp", *overrides))


def test_lopa_protocol_on_a_task_with_files_by_split_is_refused(make_cfg):
    with pytest.raises(ValueError, match="split_protocol=lopa halves one file"):
        check_config(make_cfg("dataset=rte", "dataset.split_protocol=lopa"))


def test_pass_at_k_beyond_the_samples_and_code_metrics_elsewhere_are_refused():
    with pytest.raises(ValueError, match=r"pass@5.*num_return_sequences=1"):
        task_datamodule("mbpp", metrics=["pass@5"])
    with pytest.raises(ValueError, match="do not score a code target"):
        task_datamodule("mbpp", metrics=["accuracy"])
    with pytest.raises(ValueError, match="dataset.decoding and dataset.sandbox are a code target's"):
        task_datamodule("xsum", decoding={"do_sample": True})


def test_the_lopa_code_grid_lists_every_method_on_every_task():
    jobs = GRIDS["lopa_code"].jobs()
    assert len(jobs) == 12 and {job.name.split("-")[0] for job in jobs} == {"lopa", "idpg", "prompt_tuning", "lora"}
    assert "experiment=lopa_phi2" in jobs[0].overrides and "dataset=mbpp" in jobs[0].overrides


# --- a tiny run: train, sample, score --------------------------------------------------------------------------------


def test_a_run_scores_its_test_generations_and_tests_the_final_checkpoint(make_cfg, tmp_path, monkeypatch):
    """The wiring, with a stand-in for smop.code's scoring: every problem's generations reach it in split order, its
    pass@k lands in results.json, and with no validation set the final epoch's checkpoint is tested."""
    seen = {}

    def fake_score(task, problems, generations, sandbox):
        seen.update(task=task, ids=[p["task_id"] for p in problems], n=[len(g) for g in generations], sandbox=sandbox)
        outcomes = [[type("Outcome", (), {"passed": i % 2 == 0, "reason": "stand-in"})()] for i in range(len(problems))]
        return outcomes, {"pass@1": 0.5}

    monkeypatch.setattr(smop.code.evaluation, "score", fake_score)
    results = run(make_cfg("dataset=mbpp", *TINY, "trainer.max_epochs=2", "trainer.limit_train_batches=3"))
    assert results["status"] == "completed" and results["metrics"]["val"] is None
    assert results["metrics"]["test"] == {"pass@1": 0.5, "score": 0.5} and results["metrics"]["best_epoch"] == 1
    assert seen["task"] == "mbpp" and seen["ids"] == [f"MBPP/{i}" for i in range(61, 121)] and set(seen["n"]) == {1}
    assert seen["sandbox"]["timeout"] == 15.0
    written = lines(tmp_path / "generations_test.jsonl")
    assert [line["problem_id"] for line in written] == seen["ids"] and written[0]["passed"] == [True]
    assert json.loads((tmp_path / "results.json").read_text())["split"]["protocol"] == "lopa"


@pytest.mark.parametrize("task", ["mbpp", "cruxeval_o"])
def test_tiny_offline_code_run_trains_generates_and_scores(make_cfg, task, tmp_path):
    """The real sandbox runs the tiny model's generations: an untrained model's code fails, each failure with its
    reason, and pass@1 is the share of passing samples."""
    overrides = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "+trainer.limit_test_batches=2"]
    results = run(make_cfg(f"dataset={task}", *TINY, *overrides))
    assert results["status"] == "completed"
    written = lines(tmp_path / "generations_test.jsonl")
    assert written and all(len(line["passed"]) == 1 for line in written)  # n=1 sample per problem
    passed = [p for line in written for p in line["passed"]]
    assert results["metrics"]["test"]["pass@1"] == pytest.approx(sum(passed) / len(passed))
    assert all(line["reasons"] and all(isinstance(r, str) and r for r in line["reasons"]) for line in written)


def test_sampled_generations_do_not_depend_on_the_evaluation_batch_size(tmp_path):
    """Each problem samples by its own key (run seed, its row): the same completions at eval batch 8 and 5, which
    puts every problem in another batch with other neighbours and other padding."""
    written = {}
    for size in (8, 5):
        folder = tmp_path / f"batch{size}"
        overrides = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", f"dataset.eval_batch_size={size}"]
        assert run(compose_config(["dataset=mbpp", *TINY, *overrides], folder))["status"] == "completed"
        written[size] = {line["problem_id"]: line["generations"] for line in lines(folder / "generations_test.jsonl")}
    assert written[8] == written[5] and len(written[8]) == 60
