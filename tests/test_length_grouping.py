"""dataset.group_by_length: less padding, every row once an epoch, an order of (seed, epoch) alone, the DDP
partition of ungrouped batches, and a resume mid-epoch that ends with the uninterrupted run's weights."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import compose_config
from helpers import FirstStep
from test_resume import BASE, assert_same_run, trained

from smop.data.datamodule import ResumableSampler, length_grouped
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
