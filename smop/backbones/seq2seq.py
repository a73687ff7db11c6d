"""The seq2seq kind (T5 family): the prompt goes before the encoder input, the decoder reads the target."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from smop.backbones.decoding import Decoding, check_generation, global_rng_from


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
    ) -> Tensor:
        """Decoding from the encoder input: the decoder's tokens only (its start token included), [B * n, ...] with
        rows i*n .. i*n+n-1 for example i. Greedy unless decoding.do_sample; transformers' generate draws from the
        global RNG, which a `generator` seeds for this call only (so its samples are reproducible, not the same
        draws as the causal kind's). Stop strings are transformers' own: matched on the tokens' vocabulary strings
        (special tokens included), which for real text stops where the causal kind's decoded-text check does."""
        decoding = decoding or Decoding()
        check_generation(max_new_tokens, decoding, tokenizer)
        with global_rng_from(generator, embeds.device):
            return backbone.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                **generate_options(decoding, tokenizer),
            )

    def inference_logits(self, backbone: nn.Module, embeds: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """One inference forward for counting FLOPs: the encoder, and the decoder over the label length."""
        decoder_input_ids = backbone.prepare_decoder_input_ids_from_labels(labels=labels)
        return backbone(
            inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids, use_cache=False
        ).logits
