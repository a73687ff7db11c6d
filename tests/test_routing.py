"""Routing math against hand computation."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smop.methods.routers import GumbelRouter, LinearRouter, SingleRouter, StochasticRouter
from smop.methods.smop import SparseMixtureOfPrompts, masked_mean

D, K, L = 8, 4, 3


def mixture(router_cls=LinearRouter, num_prompts: int = K, **router_options) -> SparseMixtureOfPrompts:
    torch.manual_seed(0)
    embedding = nn.Embedding(50, D)
    router = functools.partial(router_cls, **router_options)
    return SparseMixtureOfPrompts(embedding, router, num_prompts=num_prompts, prompt_length=L)


def batch(size: int = 5, length: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(size, length, D, generator=generator)
    lengths = torch.randint(2, length + 1, (size,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return embeds, mask


def by_hand(module: SparseMixtureOfPrompts, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Instance i: p_ic * P_c with c = argmax_j p_ij, p = softmax(W xbar_i), xbar_i over real tokens."""
    rows = []
    for e, m in zip(embeds, mask, strict=True):
        xbar = e[m.bool()].mean(0)
        p = F.softmax(module.router.linear.weight @ xbar, dim=-1)
        c = int(p.argmax())
        rows.append(p[c] * module.per_prompt[c])
    return torch.stack(rows)


def test_top1_gives_each_instance_its_weighted_prompt():
    module = mixture(topk=1, perturb=True).eval()
    embeds, mask = batch()
    out = module(embeds, mask)
    torch.testing.assert_close(out.prompt, by_hand(module, embeds, mask))
    assert out.routes.shape == (5, 1)


def test_prompt_of_an_instance_does_not_depend_on_its_batch():
    module = mixture(topk=1).eval()
    embeds, mask = batch(seed=1)
    other_embeds, other_mask = batch(seed=2)
    alone = module(embeds[:1], mask[:1]).prompt
    mixed = module(torch.cat([embeds[:1], other_embeds[1:]]), torch.cat([mask[:1], other_mask[1:]])).prompt
    torch.testing.assert_close(alone[0], mixed[0])


def test_masked_mean_ignores_padding():
    embeds, mask = batch()
    changed = embeds.clone()
    changed[mask == 0] = 1000.0  # whatever sits in padded positions must not matter
    torch.testing.assert_close(masked_mean(embeds, mask), masked_mean(changed, mask))
    torch.testing.assert_close(masked_mean(embeds, mask)[0], embeds[0][mask[0].bool()].mean(0))


def test_no_noise_at_eval_but_noise_in_training():
    module = mixture(topk=1, perturb=True)
    embeds, mask = batch()
    module.eval()
    torch.testing.assert_close(module(embeds, mask).prompt, module(embeds, mask).prompt)
    module.train()
    assert not torch.equal(module(embeds, mask).prompt, module(embeds, mask).prompt)


def test_perturbation_is_multiplicative_with_detached_scale():
    router = LinearRouter(D, K, topk=1, perturb=True).train()
    features = torch.randn(6, D, requires_grad=True)
    torch.manual_seed(3)
    routing = router(features)
    torch.manual_seed(3)
    logits = router.linear(features)
    eps = torch.randn_like(logits)
    expected = F.softmax(logits * (1 + eps), dim=-1)
    torch.testing.assert_close(routing.probs, expected)
    # gradient w.r.t. the logits flows through h only (the noise scale h.detach() is a constant)
    h = router.linear(features).detach().requires_grad_()
    (h + eps * h.detach()).sum().backward()
    torch.testing.assert_close(h.grad, torch.ones_like(h))


def test_top2_sums_two_weighted_prompts():
    module = mixture(topk=2, perturb=False).eval()
    embeds, mask = batch()
    out = module(embeds, mask)
    for i in range(embeds.shape[0]):
        p = F.softmax(module.router.linear.weight @ embeds[i][mask[i].bool()].mean(0), dim=-1)
        top = p.topk(2).indices
        expected = p[top[0]] * module.per_prompt[top[0]] + p[top[1]] * module.per_prompt[top[1]]
        torch.testing.assert_close(out.prompt[i], expected)


def test_emulation_flag_reproduces_the_released_batch_sum():
    module = mixture(topk=1, emulate_reference_batch_sum=True).eval()
    embeds, mask = batch()
    out = module(embeds, mask)
    p = F.softmax(masked_mean(embeds, mask) @ module.router.linear.weight.T, dim=-1)
    chosen = p.argmax(-1)
    batch_sum = module.per_prompt[chosen].sum(0)  # every routed prompt in the batch
    expected = p.gather(-1, chosen[:, None])[:, :, None] * batch_sum
    torch.testing.assert_close(out.prompt, expected)
    # and the defect is real: an instance's prompt now depends on the rest of its batch
    assert not torch.allclose(module(embeds[:1], mask[:1]).prompt[0], out.prompt[0])


@pytest.mark.parametrize("router_options", [{"topk": 2}, {"topk": 3, "perturb": False}])
def test_emulation_flag_changes_nothing_where_the_released_code_routes_per_instance(router_options):
    """The released code has the batch sum only for top-1: with k >= 2 it routes per instance."""
    flagged = mixture(emulate_reference_batch_sum=True, **router_options).eval()
    plain = mixture(**router_options).eval()
    embeds, mask = batch()
    torch.testing.assert_close(flagged(embeds, mask).prompt, plain(embeds, mask).prompt)
    torch.testing.assert_close(flagged(embeds[:1], mask[:1]).prompt[0], flagged(embeds, mask).prompt[0])


def test_emulation_flag_changes_nothing_for_the_stochastic_router():
    flagged = mixture(StochasticRouter, emulate_reference_batch_sum=True)
    embeds, mask = batch()
    torch.manual_seed(5)
    trained = flagged.train()(embeds, mask)
    torch.testing.assert_close(trained.prompt, flagged.per_prompt[trained.routes[:, 0]])  # its own prompt each
    torch.testing.assert_close(flagged.eval()(embeds, mask).prompt[0], flagged.per_prompt.mean(0))


def test_prompts_are_one_table_so_adafactor_factorises_it_as_the_released_code():
    """The released code keeps the K prompts as one [K*L, d] matrix; Adafactor's factored second moment is per row
    and column of it. One step on our parameter equals a step on that matrix, and differs from a [K, L, d] one."""
    from transformers.optimization import Adafactor

    options = {"lr": 0.5, "scale_parameter": False, "relative_step": False, "warmup_init": False, "weight_decay": 1e-5}
    module = mixture(topk=1, perturb=False).train()
    assert module.prompts.shape == (K * L, D)
    released = module.prompts.detach().clone().requires_grad_()  # the reference's [K*L, d] table
    per_prompt = module.prompts.detach().clone().view(K, L, D).requires_grad_()  # the earlier layout
    embeds, mask = batch()
    module(embeds, mask).prompt.pow(2).sum().backward()
    grad = module.prompts.grad.clone()
    released.grad, per_prompt.grad = grad.clone(), grad.view(K, L, D).clone()
    for params in ([module.prompts], [released], [per_prompt]):
        Adafactor(params, **options).step()
    torch.testing.assert_close(module.prompts.detach(), released.detach(), rtol=0, atol=0)
    assert (module.prompts.detach() - per_prompt.detach().view(K * L, D)).abs().max() > 1e-3


def test_gradients_reach_router_only_through_the_weight():
    module = mixture(topk=1, perturb=False).train()
    embeds, mask = batch()
    module(embeds, mask).prompt.sum().backward()
    assert module.router.linear.weight.grad is not None and module.router.linear.weight.grad.abs().sum() > 0
    used = set(module(embeds, mask).routes.flatten().tolist())
    for k in range(K):  # unused prompts get no gradient: routing is sparse
        assert (module.prompts.grad.view(K, L, D)[k].abs().sum() > 0) == (k in used)


def test_gumbel_is_straight_through_in_training_and_deterministic_at_eval():
    module = mixture(GumbelRouter, tau=1.0)
    embeds, mask = batch()
    module.train()
    out = module(embeds, mask)
    torch.testing.assert_close(out.prompt, module.per_prompt[out.routes[:, 0]])  # hard one-hot forward value
    module.eval()
    first, second = module(embeds, mask), module(embeds, mask)
    torch.testing.assert_close(first.prompt, second.prompt)
    logits = masked_mean(embeds, mask) @ module.router.linear.weight.T
    assert torch.equal(first.routes[:, 0], logits.argmax(-1))


def test_stochastic_router_random_in_training_mean_at_eval():
    module = mixture(StochasticRouter)
    embeds, mask = batch(size=64)
    module.train()
    routes = module(embeds, mask).routes[:, 0]
    assert len(set(routes.tolist())) > 1
    module.eval()
    torch.testing.assert_close(module(embeds, mask).prompt[3], module.per_prompt.mean(0))


def test_single_router_uses_its_one_prompt():
    module = mixture(SingleRouter, num_prompts=1).eval()
    embeds, mask = batch()
    torch.testing.assert_close(module(embeds, mask).prompt, module.per_prompt[0].expand(5, L, D))
    with pytest.raises(ValueError, match="num_prompts=4"):
        mixture(SingleRouter, num_prompts=4)


def test_topk_larger_than_prompts_is_refused():
    with pytest.raises(ValueError, match="router.topk=5"):
        mixture(topk=5)


def test_load_balancing_loss_matches_its_formula():
    module = mixture(topk=1, perturb=False, load_balance_weight=0.01).train()
    embeds, mask = batch(size=16)
    out = module(embeds, mask)
    p = F.softmax(masked_mean(embeds, mask) @ module.router.linear.weight.T, dim=-1)
    frac = torch.bincount(p.argmax(-1), minlength=K).float() / 16
    torch.testing.assert_close(out.aux_loss, 0.01 * K * (p.mean(0) * frac).sum())
    assert mixture(topk=1).train()(embeds, mask).aux_loss is None  # off by default
