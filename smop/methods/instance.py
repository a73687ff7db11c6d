"""Instance-dependent prompts from a frozen encoder's pooled vector: IDPG and LoPA (Jain et al., NeurIPS 2024).

IDPG: the prompt is MLP(x) reshaped to m x d. LoPA: a shared prompt Z_S gated per instance by a low-rank
matrix, Z = Z_S * sigmoid(u v^T) with u (m x r) and v (d x r) from two MLPs of x.
x is the pooled output of a frozen encoder, `method.encoder`:
  backbone   the frozen backbone's own encoder over the input embeddings (no download). Held in a plain
             object, so it is neither registered twice nor saved with the prompt.
  NAME/PATH  any transformers encoder by hub name or local folder (e.g. a sentence encoder; an encoder-decoder
             contributes its encoder). It reads the input through its own tokenizer: the DataModule adds
             `encoder_input_ids`/`encoder_attention_mask` to each batch (`encoder_tokenizer` below). It is a
             registered, frozen submodule (its FLOPs and parameters are counted, it moves with the system),
             kept in eval mode and left out of the state dict: it is rebuilt from its name, like the backbone.
             `method.train_encoder=true` fine-tunes it instead (at `method.encoder_lr`): then its weights train,
             its dropout is live in training, and it is saved with the prompt.
How x is pooled (`method.encoder_pooling`, POOLINGS): `auto` picks the reference's rule for the encoder's kind
(`auto_pooling`). The generators' bottleneck H defaults to the encoder's width, as in both LoPA repositories.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.modeling_outputs import ModelOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from smop.backbones import HubUnreachableError
from smop.methods.base import NO_INPUTS, PromptModule, PromptOutput, init_prompt
from smop.methods.smop import masked_mean

log = logging.getLogger(__name__)

BACKBONE = "backbone"
# auto: by the encoder's kind (auto_pooling) | mean: over the real tokens | cls: the first token | pooler: the model's
# pooler output, L2-normalised (CodeSage in the reference) | last: the last real token (decoder-only encoders)
POOLINGS = ("auto", "mean", "cls", "pooler", "last")
ENCODER_INPUTS = ("encoder_input_ids", "encoder_attention_mask")  # a separate encoder's own ids, per batch
ENCODER_MAX_LENGTH = 512  # the reference's encoder inputs: at most 512 ids, specials included


def last_token(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, n, h] -> [B, h]: each row's last real token, wherever its padding is (right here, left in the reference)."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    index = (attention_mask.long() * positions).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def pool(output: ModelOutput, attention_mask: Tensor, pooling: str) -> Tensor:
    """An encoder's output -> [B, h], as `pooling` says (one of POOLINGS but auto, which is resolved before)."""
    hidden = output.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        return last_token(hidden, attention_mask)
    if pooling == "pooler":
        return F.normalize(output.pooler_output, p=2, dim=-1)
    return masked_mean(hidden, attention_mask)


@torch.no_grad()
def has_pooler_output(model: nn.Module) -> bool:
    """Whether the model's output carries a pooler output: one forward pass over two ids tells, whatever computes it
    (a BERT pooler layer, a custom embedding model's own pooling)."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    return getattr(model(input_ids=ids, attention_mask=torch.ones_like(ids)), "pooler_output", None) is not None


def auto_pooling(model: nn.Module, config: Any) -> str:
    """The reference's pooling for this kind of encoder: the masked mean for an encoder-decoder's encoder (T5), CLS for
    BERT/RoBERTa-like masked LMs (CodeBERT), the last real token for decoder-only LMs, and for any other model (e.g. a
    custom embedding model like CodeSage) its normalised pooler output when it has one, else the masked mean."""
    if config.is_encoder_decoder:
        return "mean"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "cls"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "last"
    return "pooler" if has_pooler_output(model) else "mean"


def _unreachable(name: str, err: Exception) -> HubUnreachableError:
    reason = str(err).splitlines()[0] if str(err) else ""
    return HubUnreachableError(
        f"Could not load method.encoder='{name}' ({type(err).__name__}: {reason}).\n"
        "The Hugging Face hub is unreachable or the name/folder is wrong. To run offline:\n"
        "  - point the encoder at a local folder holding config.json, the weights and the tokenizer files\n"
        "    (written by AutoModel/AutoTokenizer .save_pretrained(folder) on a machine with network):\n"
        "      method.encoder=/path/to/all-MiniLM-L6-v2\n"
        "  - or use the frozen backbone's own encoder, which needs no download: method.encoder=backbone"
    )


def _load_error(name: str, err: Exception) -> Exception:
    """A custom-code encoder (CodeSage) refused by transformers says so; anything else: the hub or the name."""
    if "trust_remote_code" in str(err):
        return ValueError(
            f"method.encoder={name} is a custom-code model (its folder or hub repository ships the Python that defines "
            "it, as CodeSage does): if you trust that code, set method.encoder_remote_code=true"
        )
    return _unreachable(name, err)


def encoder_tokenizer(
    name: str | None, max_length: int = ENCODER_MAX_LENGTH, remote_code: bool = False
) -> PreTrainedTokenizerBase | None:
    """The separate encoder's tokenizer (None for `backbone` or no encoder). A long input keeps its END, as in the
    reference: it truncates on the left, special tokens kept, at `max_length` (512 ids: [CLS] + the last 510 tokens +
    [SEP] for RoBERTa/CodeBERT) or less where the encoder reads less: its tokenizer's limit or its position table
    (many tokenizers saved without a limit say 1e30). `remote_code`: method.encoder_remote_code."""
    if name is None or name == BACKBONE:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=remote_code)
        config = AutoConfig.from_pretrained(name, trust_remote_code=remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from err
    limits = [max_length, tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
    tokenizer.model_max_length = min(limit for limit in limits if limit)
    tokenizer.truncation_side = "left"
    return tokenizer


class BackboneEncoder:
    """The frozen backbone itself over the input embeddings, pooled, without gradients: a seq2seq backbone's encoder
    (mean-pooled by default), a causal one's decoder stack (its last real token by default, METHODS.md's rule for
    decoder-only encoders). It reads the source only, as the prompt modules do. Not an nn.Module on purpose."""

    def __init__(self, backbone: nn.Module, pooling: str) -> None:
        if pooling == "pooler":
            raise ValueError(
                "method.encoder_pooling=pooler needs an encoder with a pooler output, but method.encoder=backbone "
                "has none: use auto, mean, cls or last, or a separate method.encoder"
            )
        causal = not backbone.config.is_encoder_decoder
        # the bare stack: T5's encoder, or the decoder body of a causal LM (LlamaModel, GPT2Model) without its head
        self.encoder = backbone.base_model if causal else backbone.get_encoder()
        self.width: int = backbone.get_input_embeddings().embedding_dim
        self.pooling = ("last" if causal else "mean") if pooling == "auto" else pooling

    @torch.no_grad()
    def __call__(self, input_embeds: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
        output = self.encoder(inputs_embeds=input_embeds, attention_mask=attention_mask)
        return pool(output, attention_mask, self.pooling)


class PretrainedEncoder(nn.Module):
    """A transformers encoder (hub name or folder) over its own token ids, pooled; frozen unless `trainable`.
    `remote_code`: the model's own Python code may run (custom-code encoders such as CodeSage)."""

    def __init__(self, name: str, pooling: str, trainable: bool = False, remote_code: bool = False) -> None:
        super().__init__()
        try:
            model = AutoModel.from_pretrained(name, trust_remote_code=remote_code)
        except (OSError, ValueError) as err:
            raise _load_error(name, err) from err
        self.name, self.trainable = name, trainable
        self.model = model.get_encoder() if model.config.is_encoder_decoder else model
        self.width: int = model.config.hidden_size
        self.model.requires_grad_(trainable).train(False)
        if pooling == "pooler" and not has_pooler_output(self.model):
            raise ValueError(
                f"method.encoder_pooling=pooler, but method.encoder={name} ({model.config.model_type}) gives no pooler "
                "output: use auto, mean, cls or last"
            )
        self.pooling = auto_pooling(self.model, model.config) if pooling == "auto" else pooling
        log.info("method.encoder=%s pooled by %s (method.encoder_pooling=%s)", name, self.pooling, pooling)
        if not trainable:  # rebuilt from `name` on load: out of checkpoints and exports, as the backbone is
            self.register_state_dict_post_hook(_drop_own_keys)

    def train(self, mode: bool = True) -> PretrainedEncoder:
        """A frozen encoder stays in eval mode (no dropout), whatever the system is switched to."""
        return super().train(mode and self.trainable)

    def forward(self, input_embeds: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
        if ENCODER_INPUTS[0] not in inputs:
            raise ValueError(
                f"method.encoder={self.name} reads the input through its own tokenizer, but the batch has no "
                "encoder_input_ids: build the DataModule with encoder_tokenizer=smop.methods.instance."
                "encoder_tokenizer(method.encoder) (smop.builders.build_datamodule does)"
            )
        ids, mask = (inputs[name] for name in ENCODER_INPUTS)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            output = self.model(input_ids=ids, attention_mask=mask)
        return pool(output, mask, self.pooling)


def _drop_own_keys(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [key for key in state if key.startswith(prefix)]:
        del state[key]


def generator(width: int, hidden: int, out: int, dropout: float, std: float = 0.02) -> nn.Sequential:
    """Dropout -> Linear(h -> H) -> tanh -> Linear(H -> out); weights N(0, std), output bias 0 (the reference)."""
    mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))
    for layer in (mlp[1], mlp[3]):
        nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(mlp[3].bias)
    return mlp


class InstancePrompt(PromptModule):
    """What IDPG and LoPA share: the encoder (frozen by default), its pooled vector per instance, the generators'
    bottleneck width and the weight decay of every group."""

    needs_backbone = True

    def __init__(
        self,
        backbone: nn.Module,
        prompt_length: int,
        encoder: str = BACKBONE,
        pooling: str = "auto",
        train_encoder: bool = False,
        encoder_lr: float | None = None,
        weight_decay: float | None = None,
        encoder_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"method.encoder_pooling={pooling}: allowed {', '.join(POOLINGS)}")
        if encoder == BACKBONE:
            if train_encoder:
                raise ValueError(
                    "method.train_encoder=true fine-tunes a separate encoder, but method.encoder=backbone is the "
                    "frozen backbone's own encoder: give method.encoder=<hub name or local folder>, or "
                    "method.train_encoder=false"
                )
            self.encoder: BackboneEncoder | PretrainedEncoder = BackboneEncoder(backbone, pooling)
        else:
            self.encoder = PretrainedEncoder(encoder, pooling, train_encoder, encoder_remote_code)
            self.batch_inputs = ENCODER_INPUTS  # its own tokenizer's ids: the DataModule collates them
        self.length, self.encoder_lr, self.weight_decay = prompt_length, encoder_lr, weight_decay

    @property
    def prompt_length(self) -> int:
        return self.length

    def bottleneck(self, hidden_size: int | None) -> int:
        """H: the encoder's width when null (both LoPA repositories: 768 for CodeBERT or T5-base), else as given."""
        if hidden_size is None:
            return self.encoder.width
        if hidden_size < 1:
            raise ValueError(f"method.hidden_size={hidden_size}: a positive width, or null for the encoder's")
        return hidden_size

    def generator_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The method's own trainable parameters: everything but the encoder."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("encoder.")]

    def generator_groups(self) -> list[dict]:
        return [{"params": [p for _, p in self.generator_parameters()]}]

    def param_groups(self) -> list[dict]:
        """The generators' groups, then a fine-tuned encoder's at method.encoder_lr (or method.lr when null); all
        with method.weight_decay (0.01, torch's AdamW default the reference ran with) unless it is null."""
        own = {id(p) for _, p in self.generator_parameters()}
        encoder = [p for p in self.parameters() if p.requires_grad and id(p) not in own]
        lr = {} if self.encoder_lr is None else {"lr": self.encoder_lr}
        groups = self.generator_groups() + ([{"params": encoder, **lr}] if encoder else [])
        decay = {} if self.weight_decay is None else {"weight_decay": self.weight_decay}
        return [{**group, **decay} for group in groups]

    def pooled(self, input_embeds: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor] = NO_INPUTS) -> Tensor:
        """[B, h] in the generators' dtype (the encoder may run in another precision)."""
        dtype = next(p.dtype for name, p in self.named_parameters() if not name.startswith("encoder."))
        return self.encoder(input_embeds, attention_mask, inputs).to(dtype)


class IDPG(InstancePrompt):
    def __init__(
        self,
        embedding: nn.Embedding,
        backbone: nn.Module,
        prompt_length: int = 10,
        hidden_size: int | None = None,
        dropout: float = 0.1,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **encoder_options: Any,
    ) -> None:
        """`encoder_options`: InstancePrompt's encoder, pooling, train_encoder, encoder_lr, weight_decay and
        encoder_remote_code (the method config's keys of the same meaning)."""
        super().__init__(backbone, prompt_length, **encoder_options)
        self.d = embedding.embedding_dim
        self.mlp = generator(self.encoder.width, self.bottleneck(hidden_size), prompt_length * self.d, dropout)

    def forward(
        self, input_embeds: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor] = NO_INPUTS
    ) -> PromptOutput:
        pooled = self.pooled(input_embeds, attention_mask, inputs)
        prompt = self.mlp(pooled).view(-1, self.length, self.d)
        return PromptOutput(prompt.to(input_embeds.dtype))


class LoPA(InstancePrompt):
    def __init__(
        self,
        embedding: nn.Embedding,
        backbone: nn.Module,
        prompt_length: int = 10,
        rank: int = 4,
        hidden_size: int | None = None,
        dropout: float = 0.1,
        init: str = "random",
        init_text: str | None = None,
        shared_lr: float | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **encoder_options: Any,
    ) -> None:
        """`encoder_options`: as IDPG's."""
        super().__init__(backbone, prompt_length, **encoder_options)
        d, width, hidden = embedding.embedding_dim, self.encoder.width, self.bottleneck(hidden_size)
        self.shared = nn.Parameter(init_prompt(prompt_length, embedding, init, tokenizer, init_text))  # Z_S
        self.rows = generator(width, hidden, prompt_length * rank, dropout)  # u: m x r
        self.cols = generator(width, hidden, d * rank, dropout)  # v: d x r
        self.rank, self.shared_lr = rank, shared_lr

    def generator_groups(self) -> list[dict]:
        """One group at method.lr (the reference), or Z_S at its own `shared_lr`: a raw table wants a larger step."""
        if self.shared_lr is None:
            return super().generator_groups()
        generators = [p for name, p in self.generator_parameters() if name != "shared"]
        return [{"params": [self.shared], "lr": self.shared_lr}, {"params": generators}]

    def gate(self, pooled: Tensor) -> Tensor:
        """sigmoid(u v^T) in (0, 1), [B, m, d]: how much of each shared prompt entry an instance keeps."""
        u = self.rows(pooled).view(pooled.shape[0], self.length, self.rank)
        v = self.cols(pooled).view(pooled.shape[0], -1, self.rank)
        return torch.sigmoid(u @ v.transpose(1, 2))

    def forward(
        self, input_embeds: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor] = NO_INPUTS
    ) -> PromptOutput:
        prompt = self.shared * self.gate(self.pooled(input_embeds, attention_mask, inputs))
        return PromptOutput(prompt.to(input_embeds.dtype))
