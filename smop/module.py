"""The system: a frozen backbone (seq2seq or causal) plus one trainable prompt module (or the whole model for `full`).

What differs between the backbone kinds (where the prompted input goes, the loss, generation) is in smop.backbones."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from smop.backbones import freeze, kind_of
from smop.backbones.decoding import Decoding, truncate_at_stop
from smop.backbones.scoring import candidate_ids
from smop.checks import check_eval_mode
from smop.code.evaluation import CodeScorer
from smop.data.datamodule import target_ids
from smop.data.tasks import Task
from smop.methods.base import NO_INPUTS, PromptModule, PromptOutput
from smop.methods.lora import add_lora
from smop.metrics import RoutingCounts, TaskMetrics, map_no_answer, to_label_index, to_number

SPLITS = ("train", "val", "test", "test_alt")  # test_alt: the second test set (MNLI mismatched)
EVAL_SPLITS = SPLITS[1:]
FSDP_PREFIX = "_fsdp_wrapped_module."


# ModuleDict keys may not shadow nn.Module attributes (`train`), hence the "_split" suffix.
def _key(split: str) -> str:
    return f"{split}_split"


def consistency_loss(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """0.5 * (KL(sg p_b || p_a) + KL(sg p_a || p_b)), as the released code computes it.

    torch's kl_div(input=log q_a, target=sg p_b) and its mirror, `batchmean`: the sum over every decoder
    position (label padding included) and the vocabulary, divided by the batch size. Each pass's gradient
    flows through its own log-probabilities; the other pass is the detached target."""
    log_a, log_b = logits_a.float().log_softmax(-1), logits_b.float().log_softmax(-1)
    kl_a = F.kl_div(log_a, log_b.detach(), log_target=True, reduction="batchmean")
    kl_b = F.kl_div(log_b, log_a.detach(), log_target=True, reduction="batchmean")
    return 0.5 * (kl_a + kl_b)


class PromptTuningSystem(L.LightningModule):
    """Wires backbone + prompt + loss + generation-based metrics + optimizer. Owns no data."""

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        prompt: PromptModule | None,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        warmup_ratio: float = 0.06,
        warmup_steps: int | None = None,
        lr_schedule: str = "linear",
        max_new_tokens: int = 10,
        train_backbone: bool = False,
        train_dropout: bool = True,
        lora: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        decoding: Decoding | None = None,
        sandbox: dict[str, Any] | None = None,
        seed: int = 0,
        eval_mode: str = "generate",
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        """`decoding`, `sandbox`: how a code task's evaluation samples its generations (keyed by `seed` and each
        problem's row: the same samples at any batch size or number of devices) and runs them
        (smop.code.evaluation). `compile_options`: torch.compile's backend, mode and dynamic for the training step
        (None: not compiled)."""
        super().__init__()
        check_eval_mode(eval_mode, task.target, task.name)
        self.save_hyperparameters(config or {})  # the plain resolved config: loads with weights_only=True
        self.backbone = backbone.requires_grad_(True) if train_backbone else freeze(backbone)
        self.kind = kind_of(backbone)  # seq2seq or causal: the loss and generation of this backbone
        lora = dict(lora or {})
        self.adapter_lr = lora.pop("lr", None)
        if lora:  # LoRA + X: trainable adapters inside the frozen backbone
            add_lora(self.backbone, **lora)
        self.prompt = prompt
        self.tokenizer, self.task = tokenizer, task
        self.optimizer_factory, self.warmup_ratio, self.warmup_steps = optimizer, warmup_ratio, warmup_steps
        if lr_schedule not in ("linear", "constant"):
            raise ValueError(f"Unknown lr_schedule '{lr_schedule}'; allowed: linear, constant")
        self.lr_schedule = lr_schedule
        self.max_new_tokens = max_new_tokens
        self.eval_mode = eval_mode
        self.candidates: Tensor | None = None  # the label words' ids, for eval_mode=score (built on first use)
        self.train_backbone, self.train_dropout = train_backbone, train_dropout
        self.strict_loading = False  # checkpoints hold trainable weights only; on_load_checkpoint checks them
        num_classes = len(task.label_words)
        code = task.target == "code"  # scored by running its generations at the epoch's end, not by torchmetrics
        self.task_metrics = nn.ModuleDict(
            {} if code else {_key(s): TaskMetrics(task.metrics, num_classes) for s in EVAL_SPLITS}
        )
        self.code_scorer = CodeScorer(task, sandbox) if code else None
        self.decoding, self.seed = decoding or Decoding(), seed
        routed = prompt is not None and prompt.routes
        self.routing = nn.ModuleDict({_key(s): RoutingCounts(prompt.num_prompts) for s in SPLITS}) if routed else None
        self.routing_counts: dict[str, list[int]] = {}
        self.compile_options = dict(compile_options) if compile_options is not None else None
        self._compiled_loss: Callable[..., tuple[Tensor, Tensor]] | None = None  # compiled on first use
        # Lightning keeps each submodule's mode at the start of fit (it no longer calls .train()): set it here
        self.train(self.training)

    # --- the model ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> PromptTuningSystem:
        """Lightning switches the whole module to train mode. The backbone follows when `train_dropout` (every
        reference trains with the frozen model's dropout live: SMoP calls model.train()), else it stays in eval mode
        (no dropout: FPT's scripts set the rate to 0), also when its weights train (full fine-tuning). LoRA's own
        dropout is live in training either way."""
        super().train(mode)
        if not self.train_dropout:
            self.backbone.eval()
            for name, module in self.backbone.named_modules():
                if "lora_dropout" in name:  # adapters train inside the frozen backbone: their dropout is live
                    module.train(mode)
        return self

    def prompt_inputs(self, batch: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The batch fields the prompt module declares (`batch_inputs`), or an error naming the missing ones."""
        names = self.prompt.batch_inputs if self.prompt is not None else ()
        missing = [name for name in names if name not in batch]
        if missing:
            raise ValueError(
                f"the {type(self.prompt).__name__} prompt reads batch fields {missing}, which this batch lacks: build "
                "the DataModule with smop.builders.build_datamodule (it collates what the method declares)"
            )
        return {name: batch[name] for name in names}

    def encoder_inputs(
        self, input_ids: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor] = NO_INPUTS
    ) -> tuple[Tensor, Tensor, PromptOutput | None]:
        """[P ; E[x]] and the mask with ones for the prompt, from the source alone (never the target): the encoder input
        of a seq2seq backbone (its decoder is untouched), the start of a causal one's sequence (`self.kind` places it).

        `inputs`: the batch fields the prompt module declares (`batch_inputs`: a separate encoder's own ids)."""
        embeds = self.backbone.get_input_embeddings()(input_ids)
        if self.prompt is None:
            return embeds, attention_mask, None
        out = self.prompt(embeds, attention_mask, inputs)
        if out.input_embeds is not None:
            embeds = out.input_embeds
        ones = attention_mask.new_ones(attention_mask.shape[0], out.prompt.shape[1])
        return torch.cat([out.prompt, embeds], dim=1), torch.cat([ones, attention_mask], dim=1), out

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        inputs: Mapping[str, Tensor] = NO_INPUTS,
        loss_fn: Callable[..., tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor, PromptOutput | None]:
        """Task loss over the target tokens (plus the prompt module's auxiliary loss), the logits that predict the
        target [B, t, V], prompt output. `loss_fn`: the backbone kind's loss, or its compiled form (`step_loss`)."""
        embeds, mask, out = self.encoder_inputs(input_ids, attention_mask, inputs)
        task_loss, logits = (loss_fn or self.kind.loss)(self.backbone, embeds, mask, labels)
        loss = task_loss if out is None or out.aux_loss is None else task_loss + out.aux_loss
        return loss, logits, out

    @torch.no_grad()
    def generate_texts(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        inputs: Mapping[str, Tensor] = NO_INPUTS,
        decoding: Decoding | None = None,
        generator: torch.Generator | None = None,
        keys: Tensor | None = None,
    ) -> tuple[list[str], PromptOutput | None]:
        """The new text of each row (greedy unless `decoding` samples; num_return_sequences n gives B * n texts, rows
        i*n .. i*n+n-1 for example i), cut before the first stop string; and the prompt output. Sampled draws come
        from each example's key in `keys` when given (the same whatever the batch), else from `generator`."""
        decoding = decoding or Decoding()
        embeds, mask, out = self.encoder_inputs(input_ids, attention_mask, inputs)
        generated = self.kind.generate(
            self.backbone, embeds, mask, self.max_new_tokens, self.tokenizer, decoding, generator, keys
        )
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return truncate_at_stop(texts, decoding.stop), out

    @torch.no_grad()
    def predict_labels(
        self, input_ids: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor] = NO_INPUTS
    ) -> tuple[Tensor, PromptOutput | None]:
        """Greedy generation, normalised exact match to a label word (-1: no label word)."""
        texts, out = self.generate_texts(input_ids, attention_mask, inputs)
        return to_label_index(texts, self.task.label_words).to(input_ids.device), out

    def label_candidates(self) -> Tensor:
        """[C, t] the label words' ids as training targets them (seq2seq: EOS last; causal: the word and EOS, no BOS),
        -100-padded, on the model's device."""
        if self.candidates is None:
            causal = self.kind.name == "causal"
            self.candidates = candidate_ids(target_ids(self.tokenizer, list(self.task.label_words), causal))
        return self.candidates.to(self.device)

    @torch.no_grad()
    def score_labels(
        self, input_ids: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor] = NO_INPUTS
    ) -> tuple[Tensor, PromptOutput | None]:
        """The class whose label word is most likely (sum of its tokens' log-probabilities, EOS included, teacher
        forced): one pass over every label word instead of generation; always a class, never -1."""
        embeds, mask, out = self.encoder_inputs(input_ids, attention_mask, inputs)
        scores = self.kind.label_log_likelihoods(self.backbone, embeds, mask, self.label_candidates())
        return scores.argmax(-1), out

    # --- steps -------------------------------------------------------------------------------------
    @property
    def step_loss(self) -> Callable[..., tuple[Tensor, Tensor]]:
        """The training step's backbone call: compiled once per run with model.compile (smop.compiling), else plain."""
        if self.compile_options is None:
            return self.kind.loss
        if self._compiled_loss is None:
            from smop.compiling import compile_loss

            self._compiled_loss = compile_loss(self.kind.loss, self.compile_options, self.backbone)
        return self._compiled_loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        inputs, step = self.prompt_inputs(batch), self.step_loss
        rows = (batch["input_ids"], batch["attention_mask"], batch["labels"], inputs)
        loss, logits, out = self(*rows, loss_fn=step)
        weight = self.prompt.consistency_weight if self.prompt is not None else 0.0
        if weight > 0:  # stochastic routing: a second pass with other random prompts, and agreement between them
            loss_b, logits_b, _ = self(*rows, loss_fn=step)
            loss = loss + loss_b + weight * consistency_loss(logits, logits_b)
        self._stop_if_not_finite(loss)
        self._count_routes("train", out)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _stop_if_not_finite(self, loss: Tensor) -> None:
        """Stop before a NaN/inf loss reaches the weights; every rank stops together (one all-reduce under DDP)."""
        bad = not bool(torch.isfinite(loss.detach()))
        if self._trainer is not None and self._trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise FloatingPointError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}: "
                "stopped before the update. The checkpoints saved so far are intact; lower the learning rate "
                "(method.lr) or clip gradients (trainer.gradient_clip_val=1.0)."
            )

    def _eval_step(self, split: str, batch: dict[str, Tensor]) -> None:
        inputs = (batch["input_ids"], batch["attention_mask"], self.prompt_inputs(batch))
        if self.code_scorer is not None:  # n samples per problem, run at the epoch's end
            positions = batch["group"]  # each problem's row in its split: its samples' key with the run's seed
            keys = positions.long() + self.seed * 1_000_003
            texts, out = self.generate_texts(*inputs, decoding=self.decoding, keys=keys)
            self.code_scorer.add(positions.tolist(), batch["problems"], texts)
            self._count_routes(split, out)
            return
        if self.task.target == "number":  # the generated number against the gold value
            texts, out = self.generate_texts(*inputs)
            preds, gold = to_number(texts).to(batch["value"].device), batch["value"]
        elif self.task.target == "text":  # the generated text against every gold text (a generated "no answer": "")
            texts, out = self.generate_texts(*inputs)
            preds, gold = map_no_answer(texts, self.task.no_answer_text), batch["golds"]
        else:
            classify = self.score_labels if self.eval_mode == "score" else self.predict_labels
            (preds, out), gold = classify(*inputs), batch["label_index"]
        self.task_metrics[_key(split)].update(preds, gold, batch["group"])
        self._count_routes(split, out)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(("test", "test_alt")[dataloader_idx], batch)

    def _count_routes(self, split: str, out: PromptOutput | None) -> None:
        if self.routing is not None and out is not None and out.routes is not None:
            self.routing[_key(split)].update(out.routes)

    # --- epoch ends: metrics and routing counts ----------------------------------------------------
    def _log_epoch(self, split: str) -> None:
        if self.code_scorer is not None and split != "train":
            folder = self._trainer.default_root_dir if self._trainer is not None else None
            values = self.code_scorer.compute(self._trainer is None or self._trainer.is_global_zero, folder, split)
            self.log_dict({f"{split}/{name}": value for name, value in values.items()}, prog_bar=split == "val")
        if _key(split) in self.task_metrics:
            metrics = self.task_metrics[_key(split)]
            values = metrics.compute()
            self.log_dict(  # computed over every rank's examples by torchmetrics; sync_dist: see below
                {f"{split}/{name}": value for name, value in values.items()}, prog_bar=split == "val", sync_dist=True
            )
            metrics.reset()
        if self.routing is not None:
            counts = self.routing[_key(split)].compute().reshape(-1)  # torchmetrics squeezes K=1
            self.routing_counts[split] = counts.tolist()
            # already summed over ranks by the Metric; sync_dist averages equal values (and silences Lightning)
            self.log_dict({f"routing/{split}/prompt_{k}": c.float() for k, c in enumerate(counts)}, sync_dist=True)
            self.routing[_key(split)].reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        if len(self.trainer.num_test_batches) > 1:  # a second test set (MNLI mismatched) was evaluated
            self._log_epoch("test_alt")

    # --- optimisation ------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """The prompt module's groups, then the backbone's trainable weights (full fine-tuning, LoRA)."""
        groups = self.prompt.param_groups() if self.prompt is not None else []
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        groups.append({"params": backbone, **({"lr": self.adapter_lr} if self.adapter_lr else {})})
        return [group for group in groups if group["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.param_groups())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if self.lr_schedule == "constant":  # FPT's reference: no warmup, no decay
            scheduler = LambdaLR(optimizer, lambda _: 1.0)
        else:
            # int(): the released code's count of warmup steps (ceil would add one)
            warmup = self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total)
            scheduler = get_linear_schedule_with_warmup(optimizer, min(warmup, total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints hold the trainable weights only -----------------------------------------------
    def trainable_keys(self) -> set[str]:
        """Names as in a (full) state dict: FSDP's wrapper prefixes are not part of them."""
        return {name.replace(FSDP_PREFIX, "") for name, p in self.named_parameters() if p.requires_grad}

    def _sharded(self) -> bool:
        return any(FSDP_PREFIX in name for name, _ in self.named_parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rng"] = rng_state()  # a resumed run draws the same noise as an uninterrupted one

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model, method or shape, saying what does not match."""
        self._upgrade_layout(checkpoint)
        saved, expected = set(checkpoint.get("state_dict", {})), self.trainable_keys()
        # under FSDP the weights are flat shards: shapes are compared by the strategy's own loading
        own = {} if self._sharded() else self.state_dict()
        saved_config = checkpoint.get("hyper_parameters", {})
        problems = [
            f"{what}: checkpoint {saved_value!r} != this run {own_value!r}"
            for what, saved_value, own_value in (
                ("model", _select(saved_config, "model"), _select(self.hparams, "model")),
                ("method", _select(saved_config, "method", "name"), _select(self.hparams, "method", "name")),
            )
            if saved_value is not None and own_value is not None and saved_value != own_value
        ]
        # FSDP's strategy loads the weights itself and hands the hooks a checkpoint without them
        if "state_dict" in checkpoint and expected - saved:
            problems.append(f"missing trainable weights {sorted(expected - saved)[:5]}")
        if own and saved - set(own):
            problems.append(f"unknown weights {sorted(saved - set(own))[:5]}")
        problems += [
            f"{k}: checkpoint shape {tuple(checkpoint['state_dict'][k].shape)} != model {tuple(own[k].shape)}"
            for k in saved & set(own)
            if checkpoint["state_dict"][k].shape != own[k].shape
        ]
        if problems:
            saved_method = _select(saved_config, "method", "name") or "?"
            raise ValueError(
                f"Checkpoint does not match this model (saved method: {saved_method}): " + "; ".join(problems)
            )
        if self._trainer is not None and self._trainer.training and "rng" in checkpoint:  # `.trainer` raises if unset
            set_rng_state(checkpoint["rng"])

    def _upgrade_layout(self, checkpoint: dict[str, Any]) -> None:
        """Weights saved in an earlier layout of the prompt module load; their optimizer state cannot resume."""
        state = checkpoint.get("state_dict")
        if self.prompt is None or state is None or not self.prompt.upgrade_state_dict(state, "prompt."):
            return
        if self._trainer is not None and self._trainer.training and checkpoint.get("optimizer_states"):
            raise ValueError(
                "the checkpoint keeps SMoP's prompts as a [K, L, d] parameter (the layout of earlier versions); "
                "this version keeps one [K*L, d] table as the released code (Adafactor factorises per row and column "
                "of it), so the saved optimizer state does not fit. Evaluate it with train=false ckpt_path=..., "
                "or export it, or start a new run"
            )


def _select(config: Any, *keys: str) -> Any:
    """config[k1][k2]... or None; `model` compares the name and, for the tiny T5, its dimensions."""
    for key in keys:
        if not hasattr(config, "get"):
            return None
        config = config.get(key)
    if keys == ("model",) and config is not None:
        return {"name_or_path": config.get("name_or_path"), "tiny": config.get("tiny")}
    return config


def rng_state() -> dict[str, Any]:
    """Python's and torch's (CPU, CUDA) random states: plain tensors and ints, loadable with weights_only=True."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
