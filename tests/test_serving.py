"""Mixed-task serving: one frozen backbone, three tasks' prompts of different lengths, one batch.

Each row of the mixed batch must get what its task's model alone gives it: on the tiny T5 the same encoder states on
its real positions (its prompt is left-padded to the longest prompt), the same generated ids, the same prediction; on
the tiny Llama the same [P ; E[x]] right before the first real token, the same new tokens, logits and prediction.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SYNTHETIC
from test_export import build_perturbed
from torch.nn.functional import pad
from torch.nn.utils.rnn import pad_sequence
from transformers.modeling_outputs import BaseModelOutput

from smop.backbones.causal import IGNORE, left_aligned, take
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


@pytest.fixture(scope="module")
def causal_exports(tmp_path_factory) -> dict[str, Path]:
    """The same three tasks, methods and prompt lengths on the tiny Llama."""
    return {
        name: export_perturbed(["model=llama-tiny", *overrides], tmp_path_factory.mktemp(f"causal_{name}"))
        for name, overrides in TASKS.items()
    }


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


ORDER = ["rte", "synthetic_mixture", "cb", "cb", "rte", "synthetic_mixture", "synthetic_mixture", "rte", "cb"]
ORDER += ["synthetic_mixture", "rte", "cb"]


def interleaved(per_task: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    """Every task's rows scattered through the batch, each task's in its own order."""
    taken = dict.fromkeys(per_task, 0)
    rows = []
    for name in ORDER:
        rows.append((name, per_task[name][taken[name]]))
        taken[name] += 1
    return rows


def test_mixed_batch_equals_each_task_alone(exports):
    server = PromptServer(exports, device="cpu")
    per_task = {name: records(name, 4) for name in TASKS}
    rows = interleaved(per_task)
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
        text = server.tokenizer.decode(ref["ids"][j], skip_special_tokens=True)
        assert predictions[row] == {
            "task": name,
            "label_index": ref["labels"][j],
            "label": server.specs[name].task.label_words[ref["labels"][j]] if ref["labels"][j] >= 0 else None,
            "output": text,
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


def as_labels(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Generated tokens as a teacher-forced target: each row up to its first EOS, -100 after (the padding)."""
    after = (ids.eq(eos).long().cumsum(1) - ids.eq(eos).long()) > 0
    return ids.masked_fill(after, IGNORE)


def causal_alone(loaded, examples: list[dict]) -> dict:
    """One task on its own model: [P ; E[x]] left-aligned, new tokens (padded to its limit), their logits, labels."""
    system = loaded.system
    input_ids, attention_mask = pad_inputs(loaded.encode(examples), 0)
    embeds, mask, _ = system.encoder_inputs(input_ids, attention_mask)
    limit, tokenizer = system.max_new_tokens, system.tokenizer
    with torch.no_grad():
        new = system.kind.generate(system.backbone, embeds, mask, limit, tokenizer)
        new = pad(new, (0, limit - new.shape[1]), value=tokenizer.pad_token_id)  # when every row ended early
        logits = system.kind.loss(system.backbone, embeds, mask, as_labels(new, tokenizer.eos_token_id))[1]
        labels = system.predict_labels(input_ids, attention_mask)[0].tolist()
    order = left_aligned(mask)
    return {"sequence": take(embeds, order), "ids": new, "logits": logits, "labels": labels}


def test_causal_mixed_batch_equals_each_task_alone(causal_exports):
    """Prompts of 8, 3 and 5 tokens in one batch: each row's prompt sits right before its first real token."""
    server = PromptServer(causal_exports, device="cpu")
    assert server.kind.name == "causal"
    per_task = {name: records(name, 4) for name in TASKS}
    rows = interleaved(per_task)
    batch = server.batch(rows)
    generation = server.generate(batch)
    assert generation.encoder_states is None and generation.prompt_width == 8
    tokenizer = server.tokenizer
    limits = [server.specs[name].max_new_tokens for name, _ in rows]
    assert len(set(limits)) > 1  # the tasks' label words differ in length: rows are cut at their own limit
    assert all(len(seq) <= limit for seq, limit in zip(generation.sequences, limits, strict=True))
    ids = pad_sequence(generation.sequences, batch_first=True, padding_value=tokenizer.pad_token_id)
    embeds, mask, _ = server.encoder_inputs(batch)
    with torch.no_grad():
        logits = server.kind.loss(server.backbone, embeds, mask, as_labels(ids, tokenizer.eos_token_id))[1]
    order = left_aligned(mask)
    sequence, sequence_mask = take(embeds, order), take(mask, order)
    predictions = server.predict(rows)
    references = {
        name: causal_alone(load(folder, device="cpu"), per_task[name]) for name, folder in causal_exports.items()
    }
    seen = dict.fromkeys(TASKS, 0)
    for row, (name, _) in enumerate(rows):
        ref, j = references[name], seen[name]
        seen[name] += 1
        real = int(mask[row].sum())  # its prompt's length and its input's
        assert real == server.prompts[name].prompt_length + int(batch.attention_mask[row].sum())
        assert sequence_mask[row, -real:].all() and not sequence_mask[row, :-real].any()  # the padding first
        torch.testing.assert_close(sequence[row, -real:], ref["sequence"][j, -real:])  # [P ; E[x]] as alone
        limit = limits[row]
        assert torch.equal(pad(generation.sequences[row], (0, limit - len(generation.sequences[row]))), ref["ids"][j])
        steps = int(as_labels(ref["ids"][j : j + 1], tokenizer.eos_token_id).ne(IGNORE).sum())
        torch.testing.assert_close(logits[row, :steps], ref["logits"][j, :steps], atol=1e-4, rtol=1e-4)
        assert predictions[row]["label_index"] == ref["labels"][j], (name, j)
    assert not torch.allclose(logits[0, 0], logits[4, 0])  # two RTE rows: the logits differ, the check has teeth


def test_a_number_and_a_text_task_say_what_their_outputs_mean(tmp_path):
    """STS-B rows get the generated number, SQuAD 2.0 rows the answer ("" for the no-answer text), next to labels."""
    stsb = export_perturbed(["dataset=stsb", "method=prompt_tuning", "method.prompt_length=3"], tmp_path / "stsb")
    squad = export_perturbed(["dataset=squad_v2", "method=prompt_tuning", "method.prompt_length=4"], tmp_path / "qa")
    server = PromptServer({"stsb": stsb, "squad_v2": squad}, device="cpu")
    rows = []
    for task, name in (("stsb", "validation"), ("squad_v2", "validation")):
        record = json.loads((sample_dir(task) / f"{name}.jsonl").read_text().splitlines()[0])
        rows.append((task, record))
    number, text = server.predict(rows)
    assert set(number) == {"task", "value", "output"} and isinstance(number["value"], float)
    assert set(text) == {"task", "answer", "output"} and isinstance(text["answer"], str)
