"""eval.mode=score: label-word scores equal the kind's own teacher-forced loss, predictions do not depend on the batch,
agree with greedy generation where generation wrote a label word, and the mode is checked and recorded."""

from __future__ import annotations

import pytest
import torch
from helpers import SYNTHETIC, build_with_data, fit_fixed_batch

from smop.checks import check_config
from smop.run import run

MODELS = ["t5-tiny", "llama-tiny", "gpt2-tiny"]


def trained(make_cfg, model: str, steps: int = 40):
    """Full fine-tuning of the tiny model on one batch of the synthetic task (labels A / B), until it writes label
    words: a model whose generation and scores have something to agree on."""
    torch.manual_seed(0)
    system, datamodule = build_with_data(make_cfg(f"model={model}", "method=full", *SYNTHETIC))
    rows = datamodule.splits["train"][:16]
    batch = datamodule.collate(rows)
    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=3e-3)
    losses = fit_fixed_batch(system, batch, optimizer, steps)
    assert losses[-1] < 0.2 * losses[0]
    return system.eval(), datamodule, batch


@pytest.mark.parametrize("model", MODELS)
def test_label_scores_are_the_teacher_forced_log_likelihood_of_each_word(make_cfg, model):
    """The batched B x C pass against one (example, word) at a time through the training loss: a wrong layout
    (candidate order, repeat of the inputs) or a wrong mask shows here."""
    torch.manual_seed(0)
    system, datamodule = build_with_data(make_cfg(f"model={model}", "method=prompt_tuning", *SYNTHETIC))
    system.eval()
    batch = datamodule.collate(datamodule.splits["val"][:5])
    candidates = system.label_candidates()
    embeds, mask, _ = system.encoder_inputs(batch["input_ids"], batch["attention_mask"])
    scores = system.kind.label_log_likelihoods(system.backbone, embeds, mask, candidates)
    assert scores.shape == (5, len(system.task.label_words))
    with torch.no_grad():
        for b in range(5):
            for c, word in enumerate(candidates):
                labels = word[word.ne(-100)].unsqueeze(0)
                loss, _, _ = system(batch["input_ids"][b : b + 1], batch["attention_mask"][b : b + 1], labels)
                torch.testing.assert_close(scores[b, c], -loss * labels.shape[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", MODELS)
def test_score_predictions_do_not_depend_on_the_batch_size(make_cfg, model):
    torch.manual_seed(0)
    system, datamodule = build_with_data(make_cfg(f"model={model}", *SYNTHETIC))
    system.eval()
    rows = datamodule.splits["val"][:14]  # lengths 8-20: padding differs between batch 1 and batch 7
    one = [system.score_labels(*map(datamodule.collate([row]).get, ("input_ids", "attention_mask")))[0] for row in rows]
    seven = [
        system.score_labels(*map(datamodule.collate(rows[i : i + 7]).get, ("input_ids", "attention_mask")))[0]
        for i in (0, 7)
    ]
    assert torch.cat(one).tolist() == torch.cat(seven).tolist()


@pytest.mark.parametrize("model", MODELS)
def test_score_agrees_with_greedy_generation_where_generation_wrote_a_label_word(make_cfg, model):
    system, datamodule, batch = trained(make_cfg, model)
    generated, _ = system.predict_labels(batch["input_ids"], batch["attention_mask"])
    scored, _ = system.score_labels(batch["input_ids"], batch["attention_mask"])
    wrote = generated.ne(-1)
    assert wrote.float().mean() >= 0.75  # the comparison covers most rows
    assert scored[wrote].tolist() == generated[wrote].tolist()
    assert scored.tolist() == batch["label_index"].tolist()  # and it learned the batch


def test_score_mode_is_refused_for_a_task_without_label_words_and_an_unknown_mode_names_the_allowed(make_cfg):
    with pytest.raises(ValueError, match="eval.mode=score scores label words, but dataset stsb has target=number"):
        check_config(make_cfg("dataset=stsb", "eval.mode=score"))
    with pytest.raises(ValueError, match="eval.mode=beam is not one of: generate, score"):
        check_config(make_cfg("eval.mode=beam"))


def test_a_run_in_score_mode_records_it(make_cfg):
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "~callbacks.flop_counter", *SYNTHETIC]
    results = run(make_cfg(*short, "eval.mode=score"))
    assert results["eval_mode"] == "score" and results["status"] == "completed"
    assert results["cost"]["eval_test_examples_per_s"] > 0
    assert 0 <= results["metrics"]["test"]["accuracy"] <= 1
