"""The causal kind (decoder-only LMs: Llama, Qwen2, Phi, GPT-2, ...): the one place that says how a prompted
input becomes a sequence.

Each row is [padding ; P ; E[source] ; E[target]]: the padding comes first, the prompt sits immediately before
the first real token, the target follows the source (teacher-forced in training), and the position ids count
real positions only. An example's loss and generation therefore do not depend on what else is in its batch. The
loss covers the target tokens only. Generation starts from the embeddings [padding ; P ; E[source]] with the KV
cache, greedy or sampled (`decoding.py`), and returns the new tokens only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from smop.backbones.decoding import Decoding, check_generation, continuation_keys, next_token, reached_stop
from smop.backbones.scoring import expand, sequence_log_likelihood

IGNORE = -100


def left_aligned(mask: Tensor) -> Tensor:
    """Per row, the order that moves the padding to the front and keeps the real positions in their order."""
    return torch.sort(mask.long(), dim=1, stable=True).indices


def take(values: Tensor, order: Tensor) -> Tensor:
    """values[b, order[b]] for [B, n] or [B, n, d] values."""
    index = order if values.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, values.shape[-1])
    return values.gather(1, index)


def cache_keyword(backbone: nn.Module) -> str:
    """transformers 5.2x names the KV cache `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def position_ids(mask: Tensor) -> Tensor:
    """0, 1, 2, ... over the real positions; the padding before them gets 0 (it is masked anyway)."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


class CausalKind:
    """The prompted source from the system ([P ; E[source]] with its mask, right-padded) becomes one sequence."""

    name = "causal"

    def teacher_forced(
        self, backbone: nn.Module, embeds: Tensor, mask: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """[padding ; P ; E[source] ; E[target]] and its mask, from the prompted source and the -100-padded target."""
        target_mask = labels.ne(IGNORE)
        target = backbone.get_input_embeddings()(labels.masked_fill(~target_mask, 0)).to(embeds.dtype)
        full_mask = torch.cat([mask, target_mask.to(mask.dtype)], dim=1)
        order = left_aligned(full_mask)
        return take(torch.cat([embeds, target], dim=1), order), take(full_mask, order)

    def _logits(self, backbone: nn.Module, embeds: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits at the positions that predict each target token: [B, t, V], aligned with `labels`
        (a padded target position takes the last position's logits; the loss ignores it)."""
        sequence, sequence_mask = self.teacher_forced(backbone, embeds, mask, labels)
        positions = position_ids(sequence_mask)
        logits = backbone(
            inputs_embeds=sequence, attention_mask=sequence_mask, position_ids=positions, use_cache=False
        ).logits
        total, target_length = logits.shape[1], labels.shape[1]
        lengths = labels.ne(IGNORE).sum(1, keepdim=True)  # each row's target sits at its end
        steps = torch.arange(target_length, device=labels.device).unsqueeze(0)
        index = (total - lengths - 1 + steps).clamp(max=total - 1)
        return take(logits, index)

    def loss(self, backbone: nn.Module, embeds: Tensor, mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy over the target tokens (as T5's loss), and the target logits [B, t, V]."""
        logits = self._logits(backbone, embeds, mask, labels)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        return loss, logits

    @torch.no_grad()
    def generate(
        self,
        backbone: nn.Module,
        embeds: Tensor,
        mask: Tensor,
        max_new_tokens: int,
        tokenizer: PreTrainedTokenizerBase | None = None,
        decoding: Decoding | None = None,
        generator: torch.Generator | None = None,
        keys: Tensor | None = None,
    ) -> Tensor:
        """Decoding with the KV cache from [padding ; P ; E[source]]: the new tokens only, [B * n, <= max_new_tokens]
        with n = decoding.num_return_sequences (rows i*n .. i*n+n-1 continue example i). Greedy unless
        decoding.do_sample (then drawn by each example's key in `keys` when given, whatever the batch; else from
        `generator` when given). A row that has produced EOS, or whose new text contains a stop string, continues
        with padding."""
        decoding = decoding or Decoding()
        check_generation(max_new_tokens, decoding, tokenizer)
        eos = tokenizer.eos_token_id if tokenizer is not None else backbone.config.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else eos
        if decoding.num_return_sequences > 1:
            embeds = embeds.repeat_interleave(decoding.num_return_sequences, dim=0)
            mask = mask.repeat_interleave(decoding.num_return_sequences, dim=0)
        order = left_aligned(mask)
        sequence, sequence_mask = take(embeds, order), take(mask, order)
        positions = position_ids(sequence_mask)
        out = backbone(inputs_embeds=sequence, attention_mask=sequence_mask, position_ids=positions, use_cache=True)
        keyword, next_position = cache_keyword(backbone), positions[:, -1:] + 1
        done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        rows = continuation_keys(keys, decoding.num_return_sequences) if keys is not None else None
        tokens = []
        for step in range(max_new_tokens):
            token = next_token(out.logits[:, -1], decoding, generator, rows, step).masked_fill(done, pad)
            tokens.append(token)
            done = done | token.eq(eos)
            if decoding.stop:
                done = done | reached_stop(torch.stack(tokens, dim=1), done, tokenizer, decoding.stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            sequence_mask = torch.cat([sequence_mask, sequence_mask.new_ones(mask.shape[0], 1)], dim=1)
            out = backbone(
                input_ids=token.unsqueeze(1),
                attention_mask=sequence_mask,
                position_ids=next_position,
                use_cache=True,
                **{keyword: out["cache"] if "cache" in out else out["past_key_values"]},
            )
            next_position = next_position + 1
        return torch.stack(tokens, dim=1)

    @torch.no_grad()
    def label_log_likelihoods(self, backbone: nn.Module, embeds: Tensor, mask: Tensor, candidates: Tensor) -> Tensor:
        """[B, C] log p(label word c | [P ; source b]), EOS included (`candidates`: [C, t] ids, -100-padded): the
        source once, its KV cache repeated C times, then every example's C label words in one pass over it. The
        same positions and masks as the teacher-forced sequence [padding ; P ; E[source] ; E[label word]] of
        training, whose label padding comes after the real tokens and is masked."""
        rows, count = embeds.shape[0], candidates.shape[0]
        order = left_aligned(mask)
        sequence, sequence_mask = take(embeds, order), take(mask, order)
        positions = position_ids(sequence_mask)
        out = backbone(inputs_embeds=sequence, attention_mask=sequence_mask, position_ids=positions, use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        cache.batch_repeat_interleave(count)
        labels = expand(rows, candidates)
        real = labels.ne(IGNORE)
        steps = torch.arange(labels.shape[1], device=labels.device)
        label_out = backbone(
            input_ids=labels.masked_fill(~real, 0),
            attention_mask=torch.cat([sequence_mask.repeat_interleave(count, dim=0), real.long()], dim=1),
            position_ids=positions[:, -1:].repeat_interleave(count, dim=0) + 1 + steps,
            use_cache=False,
            **{cache_keyword(backbone): cache},
        )
        first = out.logits[:, -1:].repeat_interleave(count, dim=0)  # predicts each label word's first token
        logits = torch.cat([first, label_out.logits[:, :-1]], dim=1)
        return sequence_log_likelihood(logits, labels).view(rows, count)

    def inference_logits(self, backbone: nn.Module, embeds: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """One inference forward for counting FLOPs: prompt, source and target in one pass, without the cache."""
        return self._logits(backbone, embeds, mask, labels)

    def analytic_flops(self, config: PretrainedConfig, source_length: int, target_length: int) -> float | None:
        """The inference forward's multiply-adds per example, as fvcore counts them (`analytic_causal_flops`)."""
        return analytic_causal_flops(config, source_length, target_length)


def llama_stack_flops(config: PretrainedConfig, length: int) -> int:
    """The decoder stack of a Llama-shaped model (Llama, Mistral, Qwen2), over `length` positions.

    With d = hidden_size, h = head_dim, q = heads * h, k = key/value heads * h (GQA: fewer k, v heads), f =
    intermediate_size, T = length, per layer:
      2 T d q (q, o) + 2 T d k (k, v) + 2 T^2 q (scores and weighted sum: each query head reads its k, v head)
      + 3 T d f (gate, up, down)
    RMSNorm, rotary embeddings, SiLU and the residuals are elementwise: fvcore counts none of them.
    """
    d, f, t = config.hidden_size, config.intermediate_size, length
    head = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, k = config.num_attention_heads * head, config.num_key_value_heads * head
    return config.num_hidden_layers * (2 * t * d * q + 2 * t * d * k + 2 * t * t * q + 3 * t * d * f)


def gpt2_stack_flops(config: PretrainedConfig, length: int) -> int:
    """GPT-2's decoder stack over T = `length` positions (d = n_embd, f = n_inner or 4 d), per layer:
      4 T d^2 (fused q, k, v and the output projection) + 2 T^2 d (scores, weighted sum) + 2 T d f (MLP)
      + 2 x 5 T d (its two LayerNorms: fvcore counts 5 per element of an affine norm),
    and 5 T d for the final LayerNorm. The learned positions are an embedding lookup: free."""
    d, t = config.n_embd, length
    f = config.n_inner or 4 * d
    return config.n_layer * (4 * t * d * d + 2 * t * t * d + 2 * t * d * f + 10 * t * d) + 5 * t * d


CAUSAL_STACKS: dict[str, Callable[[PretrainedConfig, int], int]] = {
    "llama": llama_stack_flops,
    "mistral": llama_stack_flops,
    "qwen2": llama_stack_flops,
    "gpt2": gpt2_stack_flops,
}


def analytic_causal_flops(config: PretrainedConfig, source_length: int, target_length: int) -> float | None:
    """Multiply-adds per example of one causal LM inference forward, as `CausalKind.inference_logits` runs it and
    fvcore counts it: one pass without the cache over T = source_length (prompt + padded input) + target_length
    (the padded label) positions, the stack (`CAUSAL_STACKS`) and the LM head T d V (the head runs over all T
    positions; the target's logits are gathered after it). None for a model type without a formula here."""
    stack = CAUSAL_STACKS.get(config.model_type)
    if stack is None:
        return None
    length = source_length + target_length
    return float(stack(config, length) + length * config.hidden_size * config.vocab_size)
