"""model.compile on CPU with torch.compile's light backends (inductor on 2 cores is too slow for tests): the compiled
step computes the plain step, its compilation is timed apart, and checkpoints resume bit-exactly across the switch."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from helpers import SYNTHETIC, FirstStep, build

from smop.interrupts import RunStopped
from smop.run import run

COMPILED = ["model.compile=true", "model.compile_options.backend=eager"]


def trained(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("model", ["t5-tiny", "llama-tiny"])
def test_the_compiled_step_gives_the_plain_loss_gradients_and_predictions(make_cfg, model):
    torch._dynamo.reset()
    torch.manual_seed(0)
    options = [*SYNTHETIC, f"model={model}", "method=prompt_tuning", "model.compile=true"]
    system, batch = build(make_cfg(*options, "model.compile_options.backend=aot_eager"))
    assert system.step_loss is not system.kind.loss  # compiled, and once: the same function on every call
    assert system.step_loss is system.step_loss
    system.eval()
    width, target = batch["input_ids"].shape[1], batch["labels"].shape[1]
    # (rows, input length, target length): the first shape has equal sizes (8 rows, an 8-token target), the second
    # none: it must reuse the first compilation, which it would not if dynamo had tied the equal sizes together
    shapes = [(target, width, target), (5, width - 3, target - 1)]
    runs = {}
    for name, loss_fn in (("plain", system.kind.loss), ("compiled", system.step_loss)):
        for index, (rows, length, labels_length) in enumerate(shapes):
            ids, mask = batch["input_ids"][:rows, :length].clone(), batch["attention_mask"][:rows, :length].clone()
            labels = batch["labels"][:rows, :labels_length].clone()
            with torch._dynamo.config.patch(error_on_recompile=index > 0):  # compiled once, for every shape
                loss, logits, _ = system(ids, mask, labels, loss_fn=loss_fn)
            loss.backward()
            runs[name, index] = loss.detach(), logits.detach(), system.prompt.prompt.grad.clone()
            system.zero_grad(set_to_none=True)
    for (name, index), (loss, logits, grad) in runs.items():
        if name == "compiled":
            plain = runs["plain", index]
            torch.testing.assert_close(loss, plain[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(logits.argmax(-1), plain[1].argmax(-1), rtol=0, atol=0)  # the predictions
            torch.testing.assert_close(grad, plain[2], rtol=1e-4, atol=1e-6)
    assert not any("_orig_mod" in key or "compiled" in key for key in system.state_dict())  # the keys as ever


COMPILATIONS: list[int] = []


def counting_backend(graph, example_inputs):
    """A torch.compile backend that runs the graph as traced and counts its compilations."""
    COMPILATIONS.append(1)
    return graph.forward


def test_every_new_model_is_compiled_past_dynamos_recompile_limit(make_cfg):
    """The jobs of a multirun in one process each build a model: their graphs must not pile up in dynamo's one cache
    until its recompile limit, after which it would run them eager without a word (here the limit is 2)."""
    name = "counting_backend_TESTING_ONLY"
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(counting_backend, name=name)
    COMPILATIONS.clear()
    torch._dynamo.reset()
    kept = []  # every model alive: no id reused, so each one's guards fail and it needs its own graph
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(4):
            system, batch = build(make_cfg(*SYNTHETIC, "model.compile=true", f"model.compile_options.backend={name}"))
            system(batch["input_ids"], batch["attention_mask"], batch["labels"], loss_fn=system.step_loss)
            kept.append(system)
    assert len(COMPILATIONS) == 4  # one compilation per model, none fell back to eager
    torch._dynamo.reset()


def test_a_compiled_run_reports_compile_time_apart_and_pads_to_8(make_cfg):
    results = run(make_cfg(*SYNTHETIC, *COMPILED, "trainer.fast_dev_run=true"))
    assert results["status"] == "completed"
    assert results["fast_path"]["compile"] is True and results["fast_path"]["pad_to_multiple_of"] == 8
    assert results["cost"]["compile_time_s"] > 0  # the warm-up, outside step_time_s_median and train_time_s
    assert results["cost"]["inference_flops_per_example"] > 0  # FLOPs still counted (eager, uncompiled)


# --- resume: the smallest run of tests/test_resume.py's pattern, 2 epochs of 6 steps, stopped after the first -------
BASE = [*SYNTHETIC, "trainer.max_epochs=2", "~callbacks.progress_bar", "~callbacks.flop_counter", "logger=csv"]
STOP = ["+callbacks.kill._target_=helpers.SigtermAt", "+callbacks.kill.epoch_end=0"]


@pytest.mark.slow
def test_resume_with_compile_on_or_off_is_bit_exact(tmp_path):
    """A compiled run stopped after epoch 0 resumes from its checkpoint to the uninterrupted compiled run's weights,
    compiled or not: the checkpoint's keys and contents do not depend on the switch."""
    full = run(compose_config([*BASE, *COMPILED], tmp_path / "full"))
    assert full["status"] == "completed" and full["cost"]["compile_time_s"] > 0
    # off: the same padding kept (padding changes float rounding, not results; bit-exactness needs the same shapes)
    for resumed_with in (COMPILED, ["model.compile=false", "dataset.pad_to_multiple_of=8"]):
        folder = tmp_path / resumed_with[0].replace("=", "_")
        with pytest.raises(RunStopped):
            run(compose_config([*BASE, *COMPILED, *STOP], folder))
        FirstStep.first = None
        first = "+callbacks.first._target_=helpers.FirstStep"
        resumed = run(compose_config([*BASE, *resumed_with, "ckpt_path=last", first], folder))
        assert FirstStep.first == 6 and resumed["status"] == "completed"
        assert resumed["metrics"] == full["metrics"]
        ours, theirs = trained(folder), trained(tmp_path / "full")
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=f"{resumed_with}: {key}")
