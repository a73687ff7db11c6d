"""Building a system and a batch from the real config tree, for tests that drive the module directly."""

from __future__ import annotations

from omegaconf import DictConfig

from smop.backbones import build_tokenizer
from smop.module import PromptTuningSystem
from smop.run import build_datamodule, build_system

SYNTHETIC = ["dataset=synthetic_mixture", "dataset.synthetic.num_train=200", "dataset.synthetic.num_test=40"]


def build(cfg: DictConfig) -> tuple[PromptTuningSystem, dict]:
    """The system `train.py` would build for `cfg`, and a fixed batch: the first rows of its train split
    (the same for every method, whatever the methods' initialisations do to the shuffling RNG)."""
    tokenizer = build_tokenizer(cfg.model.name_or_path)
    datamodule = build_datamodule(cfg, tokenizer)
    system = build_system(cfg, datamodule, tokenizer)
    return system, datamodule.collate(datamodule.splits["train"][: datamodule.batch_size])


def fit_fixed_batch(system: PromptTuningSystem, batch: dict, optimizer, steps: int) -> list[float]:
    """Train on one batch for `steps` steps; the losses, to check that a method can learn at all."""
    system.train()
    losses = []
    for _ in range(steps):
        loss, _, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
