"""dataset.group_by_length: less padding, every row once an epoch, an order of (seed, epoch) alone, the DDP
partition of ungrouped batches, and a resume mid-epoch that ends with the uninterrupted run's weights. And
dataset.sort_eval_by_length: each rank's evaluation share longest first, with the same per-example results."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import compose_config
from helpers import SYNTHETIC, FirstStep, build_with_data
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from test_resume import BASE, assert_same_run, trained

from smop.data.datamodule import LengthSortedSampler, ResumableSampler, length_grouped
from smop.interrupts import RunStopped
from smop.run import run


def sampler(world: int = 1, rank: int = 0, batch: int = 8, grouped: bool = True, seed: int = 3) -> ResumableSampler:
    lengths = [random.Random(i).choice([6, 9, 14, 40, 120, 300]) for i in range(437)]  # mixed: short and long rows
    return ResumableSampler(
        lengths,
        num_replicas=world,
        rank=rank,
        shuffle=True,
        seed=seed,
        lengths=lengths if grouped else None,
        batch_size=batch,
    )


def batches(s: ResumableSampler, epoch: int = 0) -> list[list[int]]:
    s.set_epoch(epoch)
    order = list(s)
    return [order[i : i + s.batch_size] for i in range(0, len(order), s.batch_size)]


def padding_fraction(s: ResumableSampler) -> float:
    lengths = s.lengths or s.dataset
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches(s))
    return 1 - sum(lengths[i] for b in batches(s) for i in b) / padded


def test_grouping_cuts_the_padding_of_a_mixed_length_sample():
    plain, grouped = padding_fraction(sampler(grouped=False)), padding_fraction(sampler())
    assert plain > 0.5 and grouped < 0.1 * plain


def test_every_row_exactly_once_an_epoch_and_the_short_batch_last():
    s = sampler()
    for epoch in range(3):
        drawn = batches(s, epoch)
        assert sorted(i for b in drawn for i in b) == list(range(437))
        assert [len(b) for b in drawn] == [8] * 54 + [5]


def test_the_order_is_a_function_of_seed_and_epoch_alone():
    assert batches(sampler(), 1) == batches(sampler(), 1)
    assert batches(sampler(), 1) != batches(sampler(), 2)
    assert batches(sampler(), 1) != batches(sampler(seed=4), 1)
    one = batches(sampler(), 0)
    assert one[0] != sorted(one[0]) or one[1] != sorted(one[1])  # the batches are shuffled, not in length order
    assert len({max(sampler().lengths[i] for i in b) for b in one[:10]}) > 1


def test_n_ranks_with_batch_b_train_on_the_rows_of_one_process_with_batch_n_b():
    """Step by step the same rows; DistributedSampler's padding (437 is odd: the first row repeated at the end)."""
    single = batches(sampler(world=1, batch=16))
    ranks = [batches(sampler(world=2, rank=r, batch=8)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, rows in enumerate(single):
        together = ranks[0][step] + ranks[1][step]
        assert sorted(together) == sorted(rows + single[0][:1] * (len(together) - len(rows)))


def test_the_world_order_itself_is_whole_batches_of_similar_length():
    order = length_grouped([5, 50] * 40, batch_size=4, seed=0, epoch=0, megabatch=20)
    assert all(len({[5, 50][i % 2] for i in order[k : k + 4]}) == 1 for k in range(0, 80, 4))


@pytest.mark.slow
def test_a_resume_mid_epoch_with_grouping_ends_with_the_uninterrupted_run(tmp_path):
    grouped = [*BASE, "dataset.group_by_length=true"]
    full = run(compose_config(grouped, tmp_path / "full"))
    kill = ["+callbacks.kill._target_=helpers.SignalAt", "+callbacks.kill.signal=SIGTERM", "+callbacks.kill.step=8"]
    with pytest.raises(RunStopped):
        run(compose_config([*grouped, *kill], tmp_path / "stopped"))
    FirstStep.first = None
    resume = [*grouped, "ckpt_path=last", "+callbacks.first._target_=helpers.FirstStep"]
    resumed = run(compose_config(resume, tmp_path / "stopped"))
    assert FirstStep.first == 9  # mid-epoch 1 (6 steps an epoch): the grouped order, skipped into
    assert_same_run(resumed, tmp_path / "stopped", (full, tmp_path / "full", []))
    run(compose_config(BASE, tmp_path / "ungrouped"))
    ours, plain = trained(tmp_path / "full"), trained(tmp_path / "ungrouped")
    assert any(not torch.equal(ours[k], plain[k]) for k in ours)  # grouping did change the order trained on


# --- dataset.sort_eval_by_length: evaluation batches longest first ----------------------------------------------
def eval_rows(count: int = 101) -> list[dict]:
    return [{"input_ids": [1] * random.Random(i).choice([6, 9, 14, 40, 120, 300])} for i in range(count)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sorted_evaluation_gives_each_rank_its_share_once_longest_first(world):
    rows = eval_rows()
    orders = [list(LengthSortedSampler(rows, num_replicas=world, rank=rank)) for rank in range(world)]
    for rank, order in enumerate(orders):  # the same share as in file order, no row repeated to even the ranks
        assert sorted(order) == list(UnrepeatedDistributedSampler(rows, num_replicas=world, rank=rank, shuffle=False))
        keys = [(-len(rows[i]["input_ids"]), i) for i in order]
        assert keys == sorted(keys)  # longest first, ties in file order
    assert sorted(i for order in orders for i in order) == list(range(len(rows)))


def test_sorted_evaluation_cuts_the_padding_of_a_mixed_length_split():
    rows = eval_rows()

    def padding(order: list[int], batch: int = 8) -> float:
        chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
        padded = sum(len(c) * max(len(rows[i]["input_ids"]) for i in c) for c in chunks)
        return 1 - sum(len(row["input_ids"]) for row in rows) / padded

    plain, ordered = padding(list(range(len(rows)))), padding(list(LengthSortedSampler(rows, 1, 0)))
    assert plain > 0.6 and ordered < 0.2, (plain, ordered)  # 67% -> 15%: only where two lengths meet


@pytest.mark.parametrize("model", ["t5-tiny", "llama-tiny"])
def test_sorted_evaluation_generates_and_scores_what_file_order_does(make_cfg, model):
    """Each example's generated text and label scores do not depend on the rows it is batched with (to float
    rounding), so sorting changes the speed of an evaluation, not its result."""
    torch.manual_seed(0)
    system, datamodule = build_with_data(make_cfg(*SYNTHETIC, f"model={model}", "dataset.eval_batch_size=8"))
    system.eval()
    results = {}
    for ordered in (False, True):
        datamodule.sort_eval_by_length = ordered
        loader = datamodule.val_dataloader()
        assert isinstance(loader.sampler, LengthSortedSampler) == ordered
        texts, scores = [], []
        for batch in loader:
            inputs = (batch["input_ids"], batch["attention_mask"], system.prompt_inputs(batch))
            texts += system.generate_texts(*inputs)[0]
            embeds, mask, _ = system.encoder_inputs(*inputs)
            scores += system.kind.label_log_likelihoods(system.backbone, embeds, mask, system.label_candidates())
        order = list(loader.sampler)
        results[ordered] = {i: (text, score) for i, text, score in zip(order, texts, scores, strict=True)}
    lengths = [len(row["input_ids"]) for row in datamodule.splits["val"]]
    assert list(LengthSortedSampler(datamodule.splits["val"], 1, 0)) != list(range(len(lengths)))  # it did reorder
    assert results[True].keys() == results[False].keys()
    for i, (text, score) in results[False].items():
        assert results[True][i][0] == text
        torch.testing.assert_close(results[True][i][1], score, rtol=1e-5, atol=1e-5)
