"""Mixed-task serving: one frozen backbone, three tasks' prompts of different lengths, one batch.

Each row of the mixed batch must get what its task's model alone gives it: the same encoder states on its
real positions (its prompt is left-padded to the longest prompt), the same generated ids, the same prediction.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SYNTHETIC
from test_export import build_perturbed
from transformers.modeling_outputs import BaseModelOutput

from smop.data.sources import sample_dir
from smop.data.synthetic import synthetic_mixture
from smop.export import export_system
from smop.loading import ExportError, load, pad_inputs
from smop.serving import PromptServer

TASKS = {  # three methods, three prompt lengths: 8, 3 and 5 tokens
    "synthetic_mixture": ["method=prompt_tuning", "method.prompt_length=8", *SYNTHETIC],
    "rte": ["method=smop", "method.prompt_length=3", "router=top2"],  # routed: the prompt depends on the input
    "cb": ["dataset=cb", "method=dept", "method.prompt_length=5", "method.rank=2"],  # also updates the input embeddings
}


def export_perturbed(overrides: list[str], folder: Path) -> Path:
    return export_system(*build_perturbed(overrides, folder), folder / "export")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    return {name: export_perturbed(overrides, tmp_path_factory.mktemp(name)) for name, overrides in TASKS.items()}


def records(task: str, count: int) -> list[dict]:
    if task == "synthetic_mixture":
        return [{"text": r["text"]} for r in synthetic_mixture(count, seed=11)]
    lines = (sample_dir(task) / "val.jsonl").read_text().splitlines()[:count]
    return [{k: v for k, v in json.loads(line).items() if k != "label"} for line in lines]


def decoder_logits(backbone, states: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's logits along the generated ids: they vary by row even where the argmax does not."""
    with torch.no_grad():
        return backbone(encoder_outputs=BaseModelOutput(states), attention_mask=mask, decoder_input_ids=ids).logits


def alone(loaded, examples: list[dict]) -> dict:
    """One task served by its own model: encoder states, generated ids (padded to its limit), logits, predictions."""
    system = loaded.system
    input_ids, attention_mask = pad_inputs(loaded.encode(examples), 0)
    embeds, mask, _ = system.encoder_inputs(input_ids, attention_mask)
    limit = system.max_new_tokens
    with torch.no_grad():
        states = system.backbone.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        ids = system.backbone.generate(
            inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=limit
        )
        labels = system.predict_labels(input_ids, attention_mask)[0].tolist()
    ids = torch.nn.functional.pad(ids, (0, 1 + limit - ids.shape[1]))  # when every row ended early: pads
    logits = decoder_logits(system.backbone, states, mask, ids)
    return {"states": states, "lengths": attention_mask.sum(1).tolist(), "ids": ids, "logits": logits, "labels": labels}


def test_mixed_batch_equals_each_task_alone(exports):
    server = PromptServer(exports, device="cpu")
    per_task = {name: records(name, 4) for name in TASKS}
    order = ["rte", "synthetic_mixture", "cb", "cb", "rte", "synthetic_mixture", "synthetic_mixture", "rte", "cb"]
    order += ["synthetic_mixture", "rte", "cb"]
    taken = dict.fromkeys(TASKS, 0)
    rows = []
    for name in order:  # interleaved: every task's rows scattered through the batch
        rows.append((name, per_task[name][taken[name]]))
        taken[name] += 1
    batch = server.batch(rows)
    generation = server.generate(batch)
    ids = torch.nn.utils.rnn.pad_sequence(generation.sequences, batch_first=True)
    logits = decoder_logits(server.backbone, generation.encoder_states, generation.attention_mask, ids)
    predictions = server.predict(rows)
    references = {name: alone(load(folder, device="cpu"), per_task[name]) for name, folder in exports.items()}
    lengths = {name: server.prompts[name].prompt_length for name in TASKS}
    width = generation.prompt_width
    assert width == 8 and sorted(set(lengths.values())) == [3, 5, 8]  # two of three prompts are left-padded
    seen = dict.fromkeys(TASKS, 0)
    for row, (name, _) in enumerate(rows):
        ref, j = references[name], seen[name]
        seen[name] += 1
        real = lengths[name] + ref["lengths"][j]  # the prompt and the real input tokens
        assert generation.attention_mask[row, : width - lengths[name]].sum() == 0  # the prompt padding is masked
        torch.testing.assert_close(
            generation.encoder_states[row, width - lengths[name] : width - lengths[name] + real],
            ref["states"][j, :real],
            atol=1e-5,
            rtol=1e-4,
        )
        assert torch.equal(generation.sequences[row], ref["ids"][j]), (name, j)
        steps = len(generation.sequences[row])
        torch.testing.assert_close(logits[row, :steps], ref["logits"][j], atol=1e-4, rtol=1e-4)
        assert predictions[row] == {
            "task": name,
            "label_index": ref["labels"][j],
            "label": server.specs[name].task.label_words[ref["labels"][j]] if ref["labels"][j] >= 0 else None,
        }
    assert not torch.allclose(logits[0, 0], logits[4, 0])  # two RTE rows: the logits differ, the check has teeth


def test_each_prompt_module_runs_once_per_batch(exports, monkeypatch):
    server = PromptServer(exports, device="cpu")
    calls = []
    for name, prompt in server.prompts.items():
        monkeypatch.setattr(prompt, "forward", lambda *a, _f=prompt.forward, _n=name: calls.append(_n) or _f(*a))
    rows = [(name, example) for name in TASKS for example in records(name, 3)]
    server.generate(server.batch(rows[::-1]))
    assert sorted(calls) == sorted(TASKS)


def test_server_refuses_what_cannot_share_the_backbone(exports, tmp_path):
    lora = export_perturbed(["method=lora_prompt_tuning", "method.prompt_length=4", *SYNTHETIC], tmp_path / "lora")
    with pytest.raises(ExportError, match="changes the backbone itself"):
        PromptServer({"rte": exports["rte"], "lora": lora}, device="cpu")
    other_seed = export_perturbed([*TASKS["cb"], "seed=7"], tmp_path / "seed7")
    with pytest.raises(ExportError, match="seed7/export: the backbone rebuilt .* not the one this prompt was trained"):
        PromptServer({"rte": exports["rte"], "cb": other_seed}, device="cpu")
    server = PromptServer([exports["rte"], exports["cb"]], device="cpu")
    assert server.tasks == ["rte", "cb"]
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['boolq'\]; this server holds \['rte', 'cb'\]"):
        server.predict([("boolq", {"question": "q", "passage": "p"})])
