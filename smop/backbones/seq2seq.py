"""The seq2seq kind (T5 family): the prompt goes before the encoder input, the decoder reads the target."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase, T5Config
from transformers.modeling_outputs import BaseModelOutput

from smop.backbones.decoding import Decoding, check_generation, continuation_keys, global_rng_from, next_token
from smop.backbones.scoring import expand, sequence_log_likelihood


def generate_options(decoding: Decoding, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    """`decoding` as transformers' generate arguments, meaning what the causal kind's decode means: top_k=0 turns
    off transformers' default top-50 filter, which the causal kind does not have."""
    options: dict[str, Any] = {"do_sample": decoding.do_sample}
    if decoding.do_sample:
        options.update(
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            top_k=0,
            num_return_sequences=decoding.num_return_sequences,
        )
    if decoding.stop:
        options.update(stop_strings=list(decoding.stop), tokenizer=tokenizer)
    return options


class KeyedSampling(LogitsProcessor):
    """transformers' greedy search made a keyed sampler: each row's scores become its keyed Gumbel-max draw (one-hot),
    so the argmax greedy search takes is the draw of smop.backbones.decoding.next_token with that row's key. The
    step is the number of tokens generated so far (the decoder's ids after its start token)."""

    def __init__(self, decoding: Decoding, keys: Tensor) -> None:
        self.decoding, self.keys = decoding, keys

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        token = next_token(scores, self.decoding, keys=self.keys, step=input_ids.shape[1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)


class Seq2SeqKind:
    """[P ; E[source]] is the encoder input; the labels are the decoder's teacher-forced target."""

    name = "seq2seq"

    def loss(self, backbone: nn.Module, embeds: Tensor, mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The backbone's own loss (mean over the target tokens) and its decoder logits [B, t, V]."""
        result = backbone(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        return result.loss, result.logits

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
        """Decoding from the encoder input: the decoder's tokens only (its start token included), [B * n, ...] with
        rows i*n .. i*n+n-1 for example i. Greedy unless decoding.do_sample; with `keys` (one per example) each
        continuation draws by its own key whatever the batch (KeyedSampling); else transformers' generate draws from
        the global RNG, which a `generator` seeds for this call only (so its samples are reproducible, not the same
        draws as the causal kind's). Stop strings are transformers' own: matched on the tokens' vocabulary strings
        (special tokens included), which for real text stops where the causal kind's decoded-text check does."""
        decoding = decoding or Decoding()
        check_generation(max_new_tokens, decoding, tokenizer)
        if keys is not None and decoding.do_sample:
            n = decoding.num_return_sequences
            options = {
                k: v for k, v in generate_options(decoding, tokenizer).items() if k in ("stop_strings", "tokenizer")
            }
            return backbone.generate(
                inputs_embeds=embeds.repeat_interleave(n, dim=0),
                attention_mask=mask.repeat_interleave(n, dim=0),
                num_beams=1,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                logits_processor=LogitsProcessorList([KeyedSampling(decoding, continuation_keys(keys, n))]),
                **options,
            )
        with global_rng_from(generator, embeds.device):
            return backbone.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                **generate_options(decoding, tokenizer),
            )

    @torch.no_grad()
    def label_log_likelihoods(self, backbone: nn.Module, embeds: Tensor, mask: Tensor, candidates: Tensor) -> Tensor:
        """[B, C] log p(label word c | source b), EOS included: the encoder once per example, then one teacher-forced
        decoder pass over B x C rows (`candidates`: [C, t] ids, -100-padded)."""
        rows, count = embeds.shape[0], candidates.shape[0]
        encoded = backbone.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        labels = expand(rows, candidates)
        logits = backbone(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoded.repeat_interleave(count, dim=0)),
            attention_mask=mask.repeat_interleave(count, dim=0),
            decoder_input_ids=backbone.prepare_decoder_input_ids_from_labels(labels=labels),
            use_cache=False,
        ).logits
        return sequence_log_likelihood(logits, labels).view(rows, count)

    def inference_logits(self, backbone: nn.Module, embeds: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """One inference forward for counting FLOPs: the encoder, and the decoder over the label length."""
        decoder_input_ids = backbone.prepare_decoder_input_ids_from_labels(labels=labels)
        return backbone(
            inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids, use_cache=False
        ).logits

    def analytic_flops(self, config: T5Config, source_length: int, target_length: int) -> float:
        """The inference forward's multiply-adds per example, as fvcore counts them (`t5_inference_flops`)."""
        return t5_inference_flops(config, source_length, target_length)


def t5_inference_flops(config: T5Config, encoder_length: int, decoder_length: int) -> float:
    """Multiply-adds per example of one T5 inference forward, counted as fvcore counts (matmuls only).

    With d = d_model, i = heads * d_kv, f = d_ff, m = 2 (ReLU FFN) or 3 (gated), n encoder tokens
    (prompt + padded input), t decoder tokens, V the vocabulary:
      encoder, per layer:  4 n d i (q, k, v, o) + 2 n^2 i (scores, values) + m n d f (FFN)
      decoder, per layer:  4 t d i + 2 t^2 i (self-attention)
                           + 2 t d i (cross q, o) + 2 n d i (cross k, v) + 2 t n i (cross scores, values)
                           + m t d f (FFN)
      LM head:             t d V
    """
    d, f, vocab = config.d_model, config.d_ff, config.vocab_size
    inner = config.num_heads * config.d_kv
    ffn = 3 if config.is_gated_act else 2
    n, t = encoder_length, decoder_length
    encoder = config.num_layers * (4 * n * d * inner + 2 * n * n * inner + ffn * n * d * f)
    decoder = config.num_decoder_layers * (
        4 * t * d * inner
        + 2 * t * t * inner
        + 2 * t * d * inner
        + 2 * n * d * inner
        + 2 * t * n * inner
        + ffn * t * d * f
    )
    return float(encoder + decoder + t * d * vocab)
