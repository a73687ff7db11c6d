"""pass@k, the MBPP / CRUXEval post-processing, score_problems and the smop.code_eval CLI's file layouts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from smop.code import (
    Outcome,
    Sandbox,
    allowed_ks,
    cruxeval_answer,
    mbpp_completion,
    mean_pass_at_k,
    pass_at_k,
    program_for,
    score_problems,
)
from smop.code_eval import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
MBPP = FIXTURES / "mbpp" / "mbpp_release_v1.jsonl"
CRUXEVAL = FIXTURES / "cruxeval" / "cruxeval.jsonl"
needs_cruxeval = pytest.mark.skipif(
    not CRUXEVAL.is_file(), reason=f"the real CRUXEval file is not at {CRUXEVAL} (../shared/fixtures)"
)
needs_mbpp = pytest.mark.skipif(not MBPP.is_file(), reason=f"the real MBPP file is not at {MBPP} (../shared/fixtures)")


def rows(path: Path, count: int) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(count)]


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(timeout=5, workers=2) as box:
        yield box


# pass@k


def test_pass_at_k_against_hand_computed_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 1 - 21/252
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k: every draw of 5 holds a pass
    assert pass_at_k(1, 1, 1) == 1.0
    for n, c, k in [(20, 7, 3), (100, 13, 10), (7, 1, 7)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 1) == pytest.approx((0.4 + 0 + 1) / 3)
    assert allowed_ks(1) == [1] and allowed_ks(5) == [1, 5] and allowed_ks(200) == [1, 5, 10, 100]


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((0, 0, 1), ValueError, "n=0"),
        ((5, 6, 1), ValueError, "c=6 passing samples out of n=5"),
        ((5, -1, 1), ValueError, "c=-1"),
        ((5, 2, 6), ValueError, "k=6 with n=5"),
        ((5, 2, 0), ValueError, "k=0"),
        ((5.0, 2, 1), TypeError, "n=5.0"),
        ((5, True, 1), TypeError, "c=True"),
    ],
)
def test_pass_at_k_refuses_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        pass_at_k(*args)


def test_mean_pass_at_k_and_allowed_ks_refuse_bad_arguments():
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([], 1)
    with pytest.raises(ValueError, match="allowed_ks: n=0"):
        allowed_ks(0)


# post-processing


def test_mbpp_completion_cuts_at_the_first_stop_sequence():
    body = "    return a + b\n"
    for stop in ("\ndef", "\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```", "\n<|/"):
        assert mbpp_completion(body + stop + " more\n") == body
    assert mbpp_completion(body + "\n    if x:\n        pass") == body + "\n    if x:\n        pass"  # indented
    assert mbpp_completion(body) == body


def test_cruxeval_answer_takes_the_side_the_mode_asks_for():
    generation = "\nassert f([1, 2]) == [2, 1]\n[/ANSWER]\n"
    assert cruxeval_answer(generation, "o") == "[2, 1]"
    assert cruxeval_answer(generation, "i") == "f([1, 2])"
    assert cruxeval_answer("'a == b'", "o") == "'a == b'"  # a bare answer
    assert cruxeval_answer("assert f('x==y') == 'a==b'\n[/ANSWER]", "o") == "'a==b'"  # parsed, not split
    assert cruxeval_answer("assert f('x==y') == 'a==b'\n[/ANSWER]", "i") == "f('x==y')"
    assert cruxeval_answer("[ANSWER]\nassert f(3) == 4\n[/ANSWER]", "o") == "4"
    assert cruxeval_answer("\nassert f(3) == 4\nassert f(5) == 6", "o") == "4"  # no [/ANSWER]: the first line
    assert cruxeval_answer("\n[/ANSWER]", "o") is None
    assert cruxeval_answer("assert 3 == 4", "i") is None  # input prediction needs an f(...) call
    assert cruxeval_answer("assert f(3 == 4", "o") == "4"  # unparsable assertion: split at the first ==
    with pytest.raises(ValueError, match="mode='output'"):
        cruxeval_answer("x", "output")


def test_program_for_each_task():
    problem = {"id": "sample_9", "code": "def f(x):\n    return x + 1", "input": "1", "output": "2"}
    assert (
        program_for("cruxeval_o", problem, "\nassert f(1) == 2\n[/ANSWER]\n") == f"{problem['code']}\nassert 2 == 2\n"
    )
    assert program_for("cruxeval_i", problem, "assert f(1) == 2") == f"{problem['code']}\nassert 2 == f(1)\n"
    assert program_for("cruxeval_o", problem, "assert f(1) == f(1)") is None  # the answer calls f on the input
    assert program_for("cruxeval_i", problem, "2") is None
    mbpp = {"task_id": "MBPP/0", "prompt": "def g(a):\n", "test": "def check(c):\n    assert c(1) == 1\n"}
    mbpp["entry_point"] = "g"
    program = program_for("mbpp", mbpp, "    return a\nprint(g(1))\n")
    assert program == "def g(a):\n    return a\ndef check(c):\n    assert c(1) == 1\n\ncheck(g)\n"
    with pytest.raises(ValueError, match="unknown code task 'humaneval'; expected one of mbpp, cruxeval_o"):
        program_for("humaneval", mbpp, "")
    with pytest.raises(ValueError, match=r"needs the field\(s\) \['code'"):
        program_for("cruxeval_o", {"id": "x", "input": "1", "output": "2"}, "2")


# scoring


@needs_cruxeval
def test_score_problems_counts_unparsable_generations_as_failures(sandbox):
    problems = rows(CRUXEVAL, 3)
    generations = [
        [f"assert f({p['input']}) == {p['output']}\n[/ANSWER]", "assert f(1) == None", "\n[/ANSWER]"] for p in problems
    ]
    outcomes, scores = score_problems("cruxeval_o", problems, generations, sandbox)
    for row in outcomes:
        assert row[0] == Outcome(True, "passed")
        assert not row[1].passed and row[1].reason.startswith("AssertionError")
        assert row[2] == Outcome(False, "unparsable generation: no answer found")
    assert scores == {"pass@1": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="3 problems but 2 lists"):
        score_problems("cruxeval_o", problems, generations[:2], sandbox)
    with pytest.raises(ValueError, match="problem 0: expected a non-empty list"):
        score_problems("cruxeval_o", problems, [[], *generations[1:]], sandbox)


# the CLI


def crux_generations(problems: list[dict], mode: str) -> dict[str, list[str]]:
    """One right and one wrong generation per problem, in the raw `assert ... [/ANSWER]` form."""
    out = {}
    for p in problems:
        if mode == "o":
            out[p["id"]] = [f"\nassert f({p['input']}) == {p['output']}\n[/ANSWER]\n", "\nassert f(0) == object()\n"]
        else:
            out[p["id"]] = [f"\nassert f({p['input']}) == {p['output']}\n[/ANSWER]\n", "\nassert g() == 1\n"]
    return out


@needs_cruxeval
@pytest.mark.parametrize("task", ["cruxeval_o", "cruxeval_i"])
def test_cruxeval_scored_layout_round_trip(tmp_path, task, capsys):
    problems = rows(CRUXEVAL, 6)
    generations = crux_generations(problems, task[-1])
    path = tmp_path / f"generations_{task}.json"
    path.write_text(json.dumps(generations))
    main([f"task={task}", f"generations={path}", f"data={CRUXEVAL}", "timeout=5", "workers=2"])
    scored = json.loads((tmp_path / f"generations_{task}_scored.json").read_text())
    assert set(scored) == {"raw_generations", "raw_scored_generations", "pass_at_1", "pass_at_5", "reasons"}
    assert scored["raw_generations"] == generations
    assert scored["raw_scored_generations"] == {p["id"]: [True, False] for p in problems}
    assert scored["pass_at_1"] == pytest.approx(50.0)  # percent, as CRUXEval writes it
    assert scored["pass_at_5"] is None  # 2 generations per id: pass@5 is not defined
    summary = json.loads(capsys.readouterr().out)
    assert summary["pass_at_1"] == pytest.approx(50.0) and summary["problems"] == 6 and summary["samples"] == 12


@needs_cruxeval
def test_cruxeval_pass_at_5_with_five_generations(tmp_path):
    problems = rows(CRUXEVAL, 2)
    generations = {p["id"]: [p["output"]] + ["None"] * 4 for p in problems}  # bare answers, one right in five
    path = tmp_path / "gens.json"
    path.write_text(json.dumps(generations))
    main(["task=cruxeval_o", f"generations={path}", f"data={CRUXEVAL}", "workers=1"])
    scored = json.loads((tmp_path / "gens_scored.json").read_text())
    assert scored["pass_at_1"] == pytest.approx(20.0) and scored["pass_at_5"] == pytest.approx(100.0)


@needs_mbpp
def test_mbpp_jsonl_round_trip(tmp_path):
    problems = rows(MBPP, 4)
    lines = []
    for p in problems:
        lines.append({"task_id": p["task_id"], "completion": p["canonical_solution"] + "\nprint('trailing')"})
        first = p["canonical_solution"].lstrip("\n")
        indent = first[: len(first) - len(first.lstrip())]
        lines.append({"task_id": p["task_id"], "completion": f"{indent}return None\n"})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = subprocess.run(
        [sys.executable, "-m", "smop.code_eval", "task=mbpp", f"generations={path}", f"data={MBPP}", "workers=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    results = [json.loads(line) for line in (tmp_path / "samples_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, False] * 4
    assert all(r["result"] == "passed" for r in results[::2]) and results[1]["result"].startswith("AssertionError")
    assert [r["task_id"] for r in results] == [line["task_id"] for line in lines]
    summary = json.loads((tmp_path / "samples_summary.json").read_text())
    assert summary == {"task": "mbpp", "problems": 4, "samples": 8, "pass@1": 0.5}
    assert json.loads(result.stdout)["pass@1"] == 0.5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["task=humaneval", "generations=x"], "unknown task='humaneval'"),
        (["generations=x", "task=mbpp"], "data= is required for mbpp: the official mbpp_release_v1.jsonl"),
        (["task=mbpp"], "generations= is required"),
        (["task=mbpp", "generations=x", "colour=red"], "bad argument 'colour=red'"),
        (["task=mbpp", "generations=x", "data=/nonexistent/mbpp.jsonl"], "no such data file: /nonexistent"),
    ],
)
def test_cli_refuses_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


@needs_cruxeval
def test_cli_names_bad_files_and_ids(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"sample_0": [\n"x",\n')
    with pytest.raises(SystemExit, match=rf"{broken}:3: not JSON"):
        main(["task=cruxeval_o", f"generations={broken}", f"data={CRUXEVAL}", "workers=1"])
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"sample_9999": ["1"]}))
    with pytest.raises(SystemExit, match="id 'sample_9999' is not in"):
        main(["task=cruxeval_o", f"generations={unknown}", f"data={CRUXEVAL}", "workers=1"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["task=cruxeval_i", f"generations={tmp_path / 'missing.json'}", f"data={CRUXEVAL}", "workers=1"])
    with pytest.raises(SystemExit, match="timeout='soon': expected a float"):
        main(["task=cruxeval_i", f"generations={unknown}", f"data={CRUXEVAL}", "timeout=soon"])
    with pytest.raises(SystemExit, match=r"Sandbox workers=0: expected a int in \[1, 1024\]"):
        main(["task=cruxeval_i", f"generations={unknown}", f"data={CRUXEVAL}", "workers=0"])


@needs_mbpp
def test_cli_names_the_bad_line_of_a_jsonl(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "MBPP/1", "completion": "x"}\n{"task_id": \n')
    with pytest.raises(SystemExit, match=rf"{samples}:2: not JSON"):
        main(["task=mbpp", f"generations={samples}", f"data={MBPP}", "workers=1"])
    samples.write_text('{"task_id": "MBPP/0", "completion": "x"}\n')
    with pytest.raises(SystemExit, match="task_id 'MBPP/0' \\(sample 1\\) is not in"):
        main(["task=mbpp", f"generations={samples}", f"data={MBPP}", "workers=1"])
