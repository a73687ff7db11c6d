"""Export -> load -> predict: checkpoints written by training, the exported folder, peft's view of it, refusals; on the
tiny T5 and on the tiny Llama (decoder-only: peft folders with task_type CAUSAL_LM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, compose_config
from helpers import SYNTHETIC
from peft import PeftModel, PeftModelForCausalLM, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from test_peft_peer import peft_target_logits

import smop.export
import smop.run
from smop.backbones import build_backbone, build_tokenizer
from smop.data import Task
from smop.data.datamodule import target_ids
from smop.data.sources import sample_dir
from smop.data.synthetic import synthetic_mixture
from smop.export import export, export_system
from smop.loading import ExportError, LoadedModel, load, pad_inputs, seeded
from smop.predict import predict_file, unlabeled_examples

# A random lm_head (untied from the input embeddings): the tiny T5's outputs then vary from row to row,
# so equal generations mean something (tied, it answers the pad token to everything).
UNTIED = "++model.tiny.tie_word_embeddings=false"  # ++: llama-tiny's config sets it already
FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "test=false", UNTIED]
FAST += ["callbacks.flop_counter=null", "callbacks.progress_bar=null"]  # the checkpoint callback is what counts
RUNS = {
    "prompt_tuning": ["method=prompt_tuning", "method.prompt_length=8", *SYNTHETIC],
    "lora_prompt_tuning": ["method=lora_prompt_tuning", "method.prompt_length=8", *SYNTHETIC],
    "smop": ["method=smop", "dataset.batch_size=8"],  # RTE sample
    "full": ["method=full", *SYNTHETIC],
}


CAUSAL = "model=llama-tiny"
CAUSAL_RUNS = {
    "prompt_tuning": [CAUSAL, "method=prompt_tuning", "method.prompt_length=4", *SYNTHETIC],
    "lora_prompt_tuning": [CAUSAL, "method=lora_prompt_tuning", "method.prompt_length=6", *SYNTHETIC],
    "full": [CAUSAL, "method=full", *SYNTHETIC],
}


def train_runs(runs: dict[str, list[str]], tmp_path_factory) -> dict[str, tuple[smop.run.PromptTuningSystem, Path]]:
    """Short train.py runs: the in-memory system (as trained, best weights reloaded) and its best checkpoint."""
    trained = {}
    with pytest.MonkeyPatch.context() as patch:
        built = []
        build_system = smop.run.build_system
        patch.setattr(
            smop.run, "build_system", lambda *args, **kwargs: built.append(build_system(*args, **kwargs)) or built[-1]
        )
        for name, overrides in runs.items():
            out = tmp_path_factory.mktemp(name)
            assert smop.run.run(compose_config([*overrides, *FAST], out))["status"] == "completed"
            trained[name] = (built[-1].eval(), next((out / "checkpoints").glob("best-*.ckpt")))
    return trained


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple[smop.run.PromptTuningSystem, Path]]:
    return train_runs(RUNS, tmp_path_factory)


@pytest.fixture(scope="module")
def trained_causal(tmp_path_factory) -> dict[str, tuple[smop.run.PromptTuningSystem, Path]]:
    return train_runs(CAUSAL_RUNS, tmp_path_factory)


def build_perturbed(overrides: list[str], folder: Path) -> tuple[smop.run.PromptTuningSystem, object]:
    """The system train.py builds (seeded as train.py seeds it), its prompt weights moved away from their init."""
    cfg = compose_config([*overrides, UNTIED], folder)
    L.seed_everything(cfg.seed)  # the tiny models' random weights come from the seed
    tokenizer = build_tokenizer(cfg.model.name_or_path)
    datamodule = smop.run.build_datamodule(cfg, tokenizer, setup=False)
    system = smop.run.build_system(cfg, datamodule, tokenizer)
    generator = torch.Generator().manual_seed(len(folder.name))
    with torch.no_grad():
        for param in system.prompt.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return system.eval(), datamodule


def examples_of(name: str) -> list[dict]:
    if name == "smop":  # RTE's official validation file is the test split
        lines = (sample_dir("rte") / "val.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "label"} for line in lines[:8]]
    return synthetic_mixture(20, seed=7)


def generate(system, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy generation `predict_labels` decodes: ids, and the scores of every step [steps, B, vocab]."""
    embeds, mask, _ = system.encoder_inputs(input_ids, attention_mask)
    with torch.no_grad():
        out = system.backbone.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=system.max_new_tokens,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.scores)


def reference(system, loaded: LoadedModel, examples: list[dict]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The in-memory system's predictions, generated ids and scores on `examples`, tokenized as `loaded` does."""
    input_ids, attention_mask = pad_inputs(loaded.encode(examples), loaded.datamodule.tokenizer.pad_token_id)
    with torch.no_grad():
        labels = system.predict_labels(input_ids, attention_mask)[0].tolist()
    return labels, *generate(system, input_ids, attention_mask)


@pytest.mark.parametrize("name", list(RUNS))
def test_export_load_predict_round_trip_is_identical(trained, tmp_path, name):
    system, checkpoint = trained[name]
    folder = export(checkpoint, tmp_path / "export")
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["method"] == name and manifest["max_new_tokens"] == system.max_new_tokens
    assert manifest["task"]["label_words"] == system.task.label_words
    examples = examples_of(name)
    from_folder, from_checkpoint = load(folder, device="cpu"), load(checkpoint, device="cpu")
    expected_labels, expected_ids, expected_scores = reference(system, from_folder, examples)
    assert not torch.allclose(expected_scores[:, 0], expected_scores[:, 1])  # rows differ: the check has teeth
    for loaded in (from_folder, from_checkpoint):
        assert loaded.label(examples) == expected_labels
        _, ids, scores = reference(loaded.system, loaded, examples)
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(scores, expected_scores)
    if system.prompt is not None:
        for key, value in system.prompt.state_dict().items():
            assert torch.equal(from_folder.system.prompt.state_dict()[key], value), key
    written = {path.name for path in folder.iterdir()}
    expected = {"prompt_tuning": {"peft_prompt"}, "lora_prompt_tuning": {"peft_prompt", "peft_lora"}, "smop": set()}
    assert written - {"config.yaml", "export.json", "prompt.safetensors"} == expected.get(name, {"model"})


@pytest.mark.parametrize("method", ["p_tuning", "dept", "idpg", "lopa"])
def test_every_prompt_method_survives_export(tmp_path, method):
    """Methods trained above or not: built, perturbed, exported from memory, loaded back to the same outputs."""
    system, datamodule = build_perturbed([f"method={method}", "method.prompt_length=4", *SYNTHETIC], tmp_path)
    folder = export_system(system, datamodule, tmp_path / "export")
    loaded = load(folder, device="cpu")
    examples = synthetic_mixture(6, seed=3)
    labels, ids, scores = reference(system, loaded, examples)
    assert loaded.label(examples) == labels
    torch.testing.assert_close(reference(loaded.system, loaded, examples)[2], scores)
    assert (folder / "peft_prompt").is_dir() == (method == "p_tuning")  # the MLP's output is a static prompt
    if method == "p_tuning":
        with seeded(system.hparams["seed"]):
            base = build_backbone("tiny", system.hparams["model"]["tiny"])
        peft_model = PeftModel.from_pretrained(base, folder / "peft_prompt").eval()
        input_ids, attention_mask = pad_inputs(loaded.encode(examples), 0)
        torch.testing.assert_close(
            torch.stack(peft_generate(peft_model, input_ids, attention_mask, system.max_new_tokens).scores), scores
        )


def test_prediction_uses_the_training_tokenization(trained, make_cfg):
    """The RTE sample's official validation file is the test split: the same ids as the DataModule's."""
    loaded = load(trained["smop"][1], device="cpu")
    datamodule = smop.run.build_datamodule(make_cfg("method=smop"), loaded.datamodule.tokenizer)
    assert loaded.encode(examples_of("smop")) == [row["input_ids"] for row in datamodule.splits["test"][:8]]


def peft_generate(model: PeftModel, input_ids, attention_mask, max_new_tokens: int):
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            output_scores=True,
            return_dict_in_generate=True,
        )


def fresh_backbone(system) -> torch.nn.Module:
    """The run's frozen tiny model rebuilt from its seed, as peft would get it: without our prompt or adapters."""
    with seeded(system.hparams["seed"]):
        return build_backbone("tiny", system.hparams["model"]["tiny"])


def test_peft_loads_the_prompt_tuning_folder_with_our_prompt(trained, tmp_path):
    system, checkpoint = trained["prompt_tuning"]
    folder = export(checkpoint, tmp_path / "export")
    base = fresh_backbone(system)
    peft_model = PeftModel.from_pretrained(base, folder / "peft_prompt").eval()
    assert torch.equal(peft_model.get_prompt_embedding_to_save("default"), system.prompt.prompt.detach())
    loaded = load(folder, device="cpu")
    input_ids, attention_mask = pad_inputs(loaded.encode(examples_of("prompt_tuning")), 0)
    ids, scores = generate(system, input_ids, attention_mask)
    theirs = peft_generate(peft_model, input_ids, attention_mask, system.max_new_tokens)
    assert torch.equal(theirs.sequences, ids)
    torch.testing.assert_close(torch.stack(theirs.scores), scores)


def test_peft_loads_the_lora_folder_with_our_adapters(trained, tmp_path):
    """LoRA through peft, merged, then the prompt through peft: the generation of our LoRA + prompt tuning."""
    system, checkpoint = trained["lora_prompt_tuning"]
    folder = export(checkpoint, tmp_path / "export")
    base = fresh_backbone(system)
    lora = PeftModel.from_pretrained(base, folder / "peft_lora").eval()
    ours = get_peft_model_state_dict(system.backbone)
    theirs = {key.removeprefix("base_model.model."): value for key, value in get_peft_model_state_dict(lora).items()}
    assert set(theirs) == set(ours) and all(torch.equal(theirs[key], ours[key]) for key in ours)
    assert any(value.abs().sum() > 0 for key, value in ours.items() if "lora_B" in key)  # trained, not at init
    with_prompt = PeftModel.from_pretrained(lora.merge_and_unload(), folder / "peft_prompt").eval()
    input_ids, attention_mask = pad_inputs(load(folder, device="cpu").encode(examples_of("lora_prompt_tuning")), 0)
    ids, scores = generate(system, input_ids, attention_mask)
    theirs = peft_generate(with_prompt, input_ids, attention_mask, system.max_new_tokens)
    assert torch.equal(theirs.sequences, ids)
    torch.testing.assert_close(torch.stack(theirs.scores), scores, atol=1e-4, rtol=1e-4)  # merged LoRA: W + BA


def test_predict_streams_labels_and_names_the_bad_line(trained, tmp_path):
    system, checkpoint = trained["smop"]
    loaded = load(checkpoint, device="cpu")
    records = examples_of("smop")
    source = tmp_path / "new.jsonl"
    source.write_text(
        "\n".join(json.dumps(r) for r in records[:3]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in records[3:])
    )
    counts = predict_file(loaded, source, tmp_path / "out.jsonl", batch_size=4, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = reference(system, loaded, records)[0]
    assert counts["predictions"] == len(records) == len(lines)
    assert [line["idx"] for line in lines] == [r["idx"] for r in records]
    assert [line["label_index"] for line in lines] == expected
    words = system.task.label_words
    assert all(line["label"] == (words[line["label_index"]] if line["label_index"] >= 0 else None) for line in lines)

    bad = records[:5] + [{"idx": 99, "premise": "no hypothesis"}] + records[5:]
    source.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(ValueError, match=r"new.jsonl:6: malformed rte input: missing field\(s\) \['hypothesis'\]"):
        predict_file(loaded, source, tmp_path / "out.jsonl", batch_size=2, progress=False)
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5  # every line before it was written


def test_multirc_inputs_give_one_prediction_per_answer():
    template = "question: {question} answer: {answer} paragraph: {paragraph}"
    task = Task("multirc", template, ["False", "True"], format="multirc")
    record = json.loads((sample_dir("multirc") / "val.jsonl").read_text().splitlines()[0])
    pairs = unlabeled_examples(task, record, 0)
    answers = [(q["idx"], a["idx"]) for q in record["passage"]["questions"] for a in q["answers"]]
    assert [(idx["question"], idx["answer"]) for idx, _ in pairs] == answers
    assert all(
        idx["paragraph"] == record["idx"] and example["paragraph"] == record["passage"]["text"]
        for idx, example in pairs
    )


def test_corrupt_or_mismatched_inputs_are_refused(trained, tmp_path):
    _, checkpoint = trained["smop"]
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        export(tmp_path / "nope.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:500])
    with pytest.raises(ExportError, match="truncated.ckpt is not a readable checkpoint"):
        export(truncated)
    saved = torch.load(checkpoint, weights_only=True)
    torch.save({"state_dict": saved["state_dict"]}, tmp_path / "bare.ckpt")
    with pytest.raises(ExportError, match="holds no resolved train.py config"):
        export(tmp_path / "bare.ckpt")
    saved["state_dict"]["prompt.prompts"] = saved["state_dict"]["prompt.prompts"][:8]  # 4 prompts of 2 tokens
    torch.save(saved, tmp_path / "reshaped.ckpt")
    with pytest.raises(ExportError, match=r"prompt.prompts: checkpoint shape \(8, 128\) != model \(20, 128\)"):
        export(tmp_path / "reshaped.ckpt")

    folder = export(checkpoint, tmp_path / "export")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no earlier export"):
        export(checkpoint, tmp_path / "other")
    with pytest.raises(ExportError, match="is not an exported prompt"):
        load(tmp_path / "other")
    weights = load_file(folder / "prompt.safetensors")
    save_file({**weights, "prompts": weights["prompts"][:3]}, folder / "prompt.safetensors")
    with pytest.raises(ExportError, match=r"prompt.safetensors does not match .* prompts: file shape \(3, 128\)"):
        load(folder)
    save_file({**weights, "prompts": weights["prompts"].view(4, 5, 128)}, folder / "prompt.safetensors")
    assert torch.equal(load(folder).system.prompt.prompts, weights["prompts"])  # the earlier [K, L, d] layout loads
    export(checkpoint, folder)  # an earlier export is replaced
    config = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(config.replace("seed: 42", "seed: 43"))
    with pytest.raises(ExportError, match="not the one this prompt was trained with"):
        load(folder)


def test_export_cli(trained, tmp_path, monkeypatch):
    """python -m smop.export, in this process: Hydra's key=value arguments, one-line errors."""
    _, checkpoint = trained["prompt_tuning"]
    monkeypatch.setattr(sys, "argv", ["smop.export", f"ckpt_path={checkpoint}", f"out_dir={tmp_path / 'export'}"])
    smop.export.main()
    assert json.loads((tmp_path / "export" / "export.json").read_text())["source"]["checkpoint"] == str(checkpoint)
    monkeypatch.setattr(sys, "argv", ["smop.export", f"ckpt_path={tmp_path / 'nope.ckpt'}"])
    with pytest.raises(SystemExit, match="smop.export: No checkpoint at .*nope.ckpt"):
        smop.export.main()
    monkeypatch.setattr(sys, "argv", ["smop.export"])
    with pytest.raises(SystemExit, match="ckpt_path is required"):
        smop.export.main()


@pytest.mark.slow
def test_predict_cli(trained, tmp_path):
    """python -m smop.predict on an unlabelled JSONL file, as a user runs it."""
    system, checkpoint = trained["prompt_tuning"]
    folder = export(checkpoint, tmp_path / "export")
    source = tmp_path / "new.jsonl"
    source.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in examples_of("prompt_tuning")))
    command = [sys.executable, "-m", "smop.predict", f"prompt={folder}", f"input={source}", "device=cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert "wrote 20 predictions for 20 lines" in done.stdout + done.stderr
    lines = [json.loads(line) for line in (tmp_path / "new.predictions.jsonl").read_text().splitlines()]
    assert [line["idx"] for line in lines] == list(range(20))
    assert [line["label_index"] for line in lines] == reference(
        system, load(folder, device="cpu"), examples_of("prompt_tuning")
    )[0]


# --- decoder-only (causal) backbones ------------------------------------------------------------------------------
def causal_rows(loaded: LoadedModel, examples: list[dict]) -> list[dict]:
    """Each example's source ids (no EOS, as in training) and its gold target (the label word's ids and EOS)."""
    targets = target_ids(loaded.datamodule.tokenizer, loaded.task.label_words, causal=True)
    return [
        {"input_ids": ids, "labels": targets[example["label"]]}
        for ids, example in zip(loaded.encode(examples), examples, strict=True)
    ]


def causal_reference(system, loaded: LoadedModel, examples: list[dict]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Predictions, greedy new tokens and the teacher-forced logits of the gold targets [B, t, V] of `system`."""
    rows = causal_rows(loaded, examples)
    input_ids, attention_mask = pad_inputs([r["input_ids"] for r in rows], 0)
    labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(r["labels"]) for r in rows], True, -100)
    with torch.no_grad():
        predictions = system.predict_labels(input_ids, attention_mask)[0].tolist()
        embeds, mask, _ = system.encoder_inputs(input_ids, attention_mask)
        new = system.kind.generate(system.backbone, embeds, mask, system.max_new_tokens, system.tokenizer)
        logits = system(input_ids, attention_mask, labels)[1]
    return predictions, new, logits


def peft_folders_are_causal(folder: Path) -> None:
    for name in ("peft_prompt", "peft_lora"):
        if (folder / name).is_dir():
            assert json.loads((folder / name / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM", name


@pytest.mark.parametrize("name", list(CAUSAL_RUNS))
def test_causal_export_load_predict_round_trip_is_identical(trained_causal, tmp_path, name):
    system, checkpoint = trained_causal[name]
    folder = export(checkpoint, tmp_path / "export")
    examples = synthetic_mixture(12, seed=7)
    from_folder = load(folder, device="cpu")
    expected_labels, expected_new, expected_logits = causal_reference(system, from_folder, examples)
    assert not torch.allclose(expected_logits[0], expected_logits[1])  # rows differ: the check has teeth
    for loaded in (from_folder, load(checkpoint, device="cpu")):
        assert loaded.label(examples) == expected_labels
        labels, new, logits = causal_reference(loaded.system, loaded, examples)
        assert labels == expected_labels and torch.equal(new, expected_new)
        torch.testing.assert_close(logits, expected_logits)
    written = {path.name for path in folder.iterdir()} - {"config.yaml", "export.json", "prompt.safetensors"}
    expected = {"prompt_tuning": {"peft_prompt"}, "lora_prompt_tuning": {"peft_prompt", "peft_lora"}, "full": {"model"}}
    assert written == expected[name]
    peft_folders_are_causal(folder)
    source = tmp_path / "new.jsonl"  # smop.predict on the exported folder
    source.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in examples))
    predict_file(from_folder, source, tmp_path / "out.jsonl", batch_size=5, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["label_index"] for line in lines] == expected_labels


@pytest.mark.parametrize("method", ["smop", "p_tuning", "idpg", "lopa"])  # DePT: tests/test_serving.py
def test_every_prompt_method_survives_a_causal_export(tmp_path, method):
    """As on the T5: only a static prompt (prompt tuning's table, P-tuning's MLP output) becomes a peft folder."""
    overrides = [CAUSAL, f"method={method}", "method.prompt_length=4", *SYNTHETIC]
    system, datamodule = build_perturbed(overrides, tmp_path)
    folder = export_system(system, datamodule, tmp_path / "export")
    loaded = load(folder, device="cpu")
    examples = synthetic_mixture(6, seed=3)
    labels, new, logits = causal_reference(system, loaded, examples)
    assert loaded.label(examples) == labels
    theirs = causal_reference(loaded.system, loaded, examples)
    assert torch.equal(theirs[1], new)
    torch.testing.assert_close(theirs[2], logits)
    assert (folder / "peft_prompt").is_dir() == (method == "p_tuning")
    peft_folders_are_causal(folder)
    if method == "p_tuning":  # peft with the MLP's output as its prompt: our target logits
        peft_model = PeftModel.from_pretrained(fresh_backbone(system), folder / "peft_prompt").eval()
        check_peft_target_logits(peft_model, loaded, examples, logits)


def check_peft_target_logits(peft_model, loaded: LoadedModel, examples: list[dict], logits, **tol) -> None:
    """peft fed source + target (right-padded; labels -100 on the source) predicts the target with our logits."""
    rows = causal_rows(loaded, examples)
    _, theirs = peft_target_logits(peft_model, rows)
    for b, row in enumerate(rows):
        torch.testing.assert_close(theirs[b], logits[b, : len(row["labels"])], **tol)


def test_peft_loads_the_causal_prompt_tuning_folder_with_our_prompt(trained_causal, tmp_path):
    system, checkpoint = trained_causal["prompt_tuning"]
    folder = export(checkpoint, tmp_path / "export")
    peft_model = PeftModel.from_pretrained(fresh_backbone(system), folder / "peft_prompt").eval()
    assert isinstance(peft_model, PeftModelForCausalLM)
    assert torch.equal(peft_model.get_prompt_embedding_to_save("default"), system.prompt.prompt.detach())
    loaded = load(folder, device="cpu")
    examples = synthetic_mixture(12, seed=7)
    _, _, logits = causal_reference(system, loaded, examples)
    check_peft_target_logits(peft_model, loaded, examples, logits, rtol=1e-4, atol=1e-4)


def test_peft_loads_the_causal_lora_folder_with_our_adapters(trained_causal, tmp_path):
    """LoRA through peft (CAUSAL_LM), merged, then the prompt through peft: our LoRA + prompt tuning's logits."""
    system, checkpoint = trained_causal["lora_prompt_tuning"]
    folder = export(checkpoint, tmp_path / "export")
    lora = PeftModel.from_pretrained(fresh_backbone(system), folder / "peft_lora").eval()
    assert isinstance(lora, PeftModelForCausalLM)
    ours = get_peft_model_state_dict(system.backbone)
    theirs = {key.removeprefix("base_model.model."): value for key, value in get_peft_model_state_dict(lora).items()}
    assert set(theirs) == set(ours) and all(torch.equal(theirs[key], ours[key]) for key in ours)
    assert any(value.abs().sum() > 0 for key, value in ours.items() if "lora_B" in key)  # trained, not at init
    with_prompt = PeftModel.from_pretrained(lora.merge_and_unload(), folder / "peft_prompt").eval()
    loaded = load(folder, device="cpu")
    examples = synthetic_mixture(12, seed=7)
    _, _, logits = causal_reference(system, loaded, examples)
    check_peft_target_logits(with_prompt, loaded, examples, logits, rtol=1e-3, atol=1e-3)  # merged: W + BA
