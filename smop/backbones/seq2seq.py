"""The seq2seq kind (T5 family): the prompt goes before the encoder input, the decoder reads the target."""

from __future__ import annotations

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase


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
    ) -> Tensor:
        """Greedy decoding from the encoder input; the decoder's tokens only (its start token included)."""
        return backbone.generate(
            inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens
        )

    def inference_logits(self, backbone: nn.Module, embeds: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """One inference forward for counting FLOPs: the encoder, and the decoder over the label length."""
        decoder_input_ids = backbone.prepare_decoder_input_ids_from_labels(labels=labels)
        return backbone(
            inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids, use_cache=False
        ).logits
