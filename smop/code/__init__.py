"""Scoring generated code: a process sandbox, pass@k, and how MBPP / CRUXEval generations become programs."""

from smop.code.passk import allowed_ks, mean_pass_at_k, pass_at_k
from smop.code.programs import TASKS, cruxeval_answer, mbpp_completion, mbpp_program, program_for
from smop.code.sandbox import Outcome, Sandbox
from smop.code.scoring import score_problems

__all__ = [
    "TASKS",
    "Outcome",
    "Sandbox",
    "allowed_ks",
    "cruxeval_answer",
    "mbpp_completion",
    "mbpp_program",
    "mean_pass_at_k",
    "pass_at_k",
    "program_for",
    "score_problems",
]
