"""A task's records (SuperGLUE, GLUE, the synthetic mixture, ...) as a LightningDataModule with dynamic padding."""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from smop.data.sources import (
    DEFAULT_SPLITS,
    SOURCES,
    SPLIT_ROLES,
    check_official,
    file_aliases,
    load_split_records,
)
from smop.data.splits import (
    capped_part,
    check_k_shot,
    check_max_train_records,
    check_protocol,
    describe,
    divide,
    k_shot_part,
    smop_split,
    units,
    with_test_alt,
)
from smop.data.synthetic import synthetic_mixture
from smop.data.tasks import GENERATED, Task, check_train_targets, choose_template, each_gold, flatten, raw_label


def encode(
    task: Task, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]], budget: int, causal: bool = False
) -> list[list[int]]:
    """Token ids of each formatted example, at most `budget` long (EOS included).

    A too-long example first loses tokens from its long field (`task.truncate_field`, e.g. the passage),
    so that the closing fields and the EOS survive; only if that is not enough is the end cut, or, with
    `task.truncate_side == "left"` (code prompts, which end where the model writes), the start (a leading BOS kept).
    `causal`: the source of a decoder-only LM, which the target continues: without the EOS (a BOS the tokenizer
    adds stays).
    """

    def ids_of(texts: list[str]) -> list[list[int]]:
        encoded = tokenizer(texts).input_ids
        return [without_eos(ids, tokenizer.eos_token_id) for ids in encoded] if causal else encoded

    texts = [task.template.format(**example) for example in examples]
    encoded = ids_of(texts)
    for i, ids in enumerate(encoded):
        if len(ids) <= budget:
            continue
        example = dict(examples[i])
        for _ in range(3):
            if not task.truncate_field or len(ids) <= budget:
                break
            field_ids = tokenizer(example[task.truncate_field], add_special_tokens=False).input_ids
            keep = max(0, len(field_ids) - (len(ids) - budget) - 1)
            example[task.truncate_field] = tokenizer.decode(field_ids[:keep], skip_special_tokens=True)
            ids = ids_of([task.template.format(**example)])[0]
        if len(ids) > budget and task.truncate_side == "left":
            ids = keep_end(ids, budget, tokenizer.bos_token_id)
        elif len(ids) > budget:
            ids = ids[:budget] if causal else ids[: budget - 1] + [tokenizer.eos_token_id]
        encoded[i] = ids
    return encoded


def keep_end(ids: list[int], budget: int, bos_token_id: int | None) -> list[int]:
    """The last `budget` ids (an EOS at the end stays), after the BOS when the sequence starts with one."""
    if bos_token_id is not None and budget > 1 and ids and ids[0] == bos_token_id:
        return [bos_token_id] + ids[len(ids) - budget + 1 :]
    return ids[len(ids) - budget :]


def numeric_id(value: Any) -> int:
    """The last integer in a record id (MBPP's `MBPP/17` -> 17): what dataset.official_ranges compare."""
    numbers = re.findall(r"\d+", str(value))
    if not numbers:
        raise ValueError(f"record id {value!r} holds no number for dataset.official_ranges")
    return int(numbers[-1])


def without_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    return ids[:-1] if ids and eos_token_id is not None and ids[-1] == eos_token_id else ids


def target_ids(tokenizer: PreTrainedTokenizerBase, words: list[str], causal: bool = False) -> list[list[int]]:
    """Each label word's ids: as the tokenizer encodes it (T5: EOS last); for a causal LM the word's own tokens and
    the EOS, never a BOS (the target continues the source)."""
    if not causal:
        return tokenizer(words).input_ids
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(words, add_special_tokens=False).input_ids]


def truncate_target(ids: list[int], length: int, eos_token_id: int | None) -> list[int]:
    """At most `length` target ids, the EOS kept last when the tokenizer has one (the model learns to stop there)."""
    if len(ids) <= length:
        return ids
    if eos_token_id is None or ids[-1] != eos_token_id:
        return ids[:length]
    return ids[: length - 1] + [eos_token_id]


MEGABATCH = 50  # group_by_length: batches per megabatch, the span within which rows are sorted by length


def length_grouped(lengths: list[int], batch_size: int, seed: int, epoch: int, megabatch: int = MEGABATCH) -> list[int]:
    """One epoch's order with batches of similar lengths: the seeded permutation of (seed, epoch), cut into
    megabatches of `megabatch` batches, each sorted by length (longest first) and cut into batches of `batch_size`;
    the full batches shuffled by the same generator, a short last one kept last (so every batch before it stays
    whole). A function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * megabatch
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    short = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in shuffled + short for i in batch]


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can skip the examples of one epoch that a checkpoint had already trained on, and, with
    `lengths` (dataset.group_by_length), group rows of similar length into batches.

    Grouped, the batches are built for the whole world (`batch_size` x ranks rows, `length_grouped`) and each rank takes
    every N-th row as DistributedSampler does: step k on N ranks with batch b trains on exactly the rows of step k of
    one process with batch N*b, as ungrouped. The order depends on (seed, epoch) only, so a resumed run skips into
    the same list."""

    def __init__(self, *args: Any, lengths: list[int] | None = None, batch_size: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_epoch, self.skip = -1, 0
        self.lengths, self.batch_size = lengths, batch_size

    def resume(self, epoch: int, skip: int) -> None:
        self.resume_epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.lengths is None:
            return list(super().__iter__())
        world = length_grouped(self.lengths, self.batch_size * self.num_replicas, self.seed, self.epoch)
        padding = self.total_size - len(world)  # as DistributedSampler pads: the list's start repeated at its end
        world += (world * -(-padding // len(world)))[:padding] if padding > 0 else []
        return world[self.rank : self.total_size : self.num_replicas]

    def __iter__(self):  # noqa: ANN204 - the parent's signature
        indices = self._indices()  # runs at the first batch, after Lightning's set_epoch
        return iter(indices[self.skip :] if self.epoch == self.resume_epoch else indices)


class LengthSortedSampler(UnrepeatedDistributedSampler):
    """This rank's evaluation share, as UnrepeatedDistributedSampler gives it, longest input first (ties in file
    order): each batch holds rows of similar length, so padding does not dominate, and a batch too large for the
    device fails at the first one. Metrics, route counts and code scoring do not depend on the order."""

    def __init__(self, dataset: list[dict[str, Any]], num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.lengths = [len(row["input_ids"]) for row in dataset]

    def __iter__(self):  # noqa: ANN204 - the parent's signature
        return iter(sorted(super().__iter__(), key=lambda i: -self.lengths[i]))


def pad_width(batch: torch.Tensor, multiple: int | None, value: int) -> torch.Tensor:
    """[B, n] padded on the right with `value` to the next multiple of `multiple` (fewer distinct shapes for a
    compiled step, aligned tiles for tensor cores); unchanged when `multiple` is None."""
    if multiple is None or batch.shape[1] % multiple == 0:
        return batch
    return torch.nn.functional.pad(batch, (0, multiple - batch.shape[1] % multiple), value=value)


class TaskDataModule(L.LightningDataModule):
    """Train / validation (a seeded 90/10 split of the official train set) / test (`splits.test`: the official
    validation set by default)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        template: str | None,
        label_words: list[str],
        label_names: list[Any] | None = None,
        metrics: list[str] | None = None,
        truncate_field: str | None = None,
        source: str = "sample",
        data_dir: str | None = None,
        hub_name: str = "aps/super_glue",
        hub_config: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        max_length: int = 512,
        prompt_length: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        synthetic: dict[str, Any] | None = None,
        seed: int = 0,
        encoder_tokenizer: PreTrainedTokenizerBase | None = None,
        causal: bool = False,
        fields: list[str] | None = None,
        format: str = "flat",
        splits: dict[str, str] | None = None,
        target: str = "labels",
        number_range: list[float] | None = None,
        split_protocol: str = "smop",
        dept_split: str = "small",
        label_field: str = "label",
        k_shot: int | None = None,
        dept_steps: int | None = None,
        dept_max_length: int | None = None,
        target_field: str | None = None,
        no_answer_text: str | None = None,
        max_target_length: int | None = None,
        max_train_records: int | None = None,
        target_template: str | None = None,
        truncate_side: str = "right",
        split_files: dict[str, Any] | None = None,
        sample_folder: str | None = None,
        official_ranges: dict[str, list[int]] | None = None,
        id_field: str | None = None,
        decoding: dict[str, Any] | None = None,
        sandbox: dict[str, Any] | None = None,
        templates: dict[str, str] | None = None,
        template_style: str | None = None,
        train_targets: str = "first",
        official_files: dict[str, str] | None = None,
        official_format: str | None = None,
        group_by_length: bool = False,
        sort_eval_by_length: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        """`causal`: the backbone is a decoder-only LM (see `encode` and `target_ids`); its whole sequence, prompt,
        source and target, fits `max_length`. `splits`: the hub's files by role (smop.data.sources.SPLIT_ROLES), e.g.
        MNLI's validation_matched. `label_field`: the record's label field (WinoGrande's `answer`).
        `split_protocol`, `dept_split`, `k_shot` (training rows per class): see smop.data.splits. `dept_steps`,
        `dept_max_length`: DePT's released run for this task, read by experiment=dept_glue / dept_superglue
        (trainer.max_steps, dataset.max_length), not here. `target_field`, `no_answer_text`, `max_target_length`: a
        free-text target (QA, summaries): where its golds are, what an unanswerable question's target is, and its
        length in tokens (EOS included), which bounds the training target and the generation. `max_train_records`: a cap
        on the training rows (smop.data.splits.capped_part; Yelp-2: DePT's 100,000). `target_template`: a
        code target's text over the record (its generations are run, smop.code.evaluation); `truncate_side`: left
        keeps a too-long source's end. `split_files`: the task's own file names of hub splits in a folder (MBPP's
        mbpp_release_v1.jsonl); `sample_folder`: the bundled sample's folder when another task's (CRUXEval's two
        tasks share one). `official_ranges`, `id_field`: the official split of a one-file task by id ranges.
        `decoding` (smop.backbones.decoding.Decoding's options) and `sandbox` (smop.code.sandbox.Sandbox's): how a
        code task's test generations are sampled and run. `templates`,
        `template_style`: a task's alternative templates by style (DePT's, FPT's), `template` being the chosen one
        (smop.data.tasks.choose_template). `train_targets`: `each` trains a text target on every unique gold (one
        row each, ReCoRD), `first` on the first; evaluation rows are one per example either way. `official_files`,
        `official_format`: a split's official JSON document in a `dir` folder and its reader (SQuAD's
        train-v2.0.json; smop.data.official). `group_by_length`: training batches of rows of similar input length
        (`ResumableSampler`), so that padding does not dominate; `sort_eval_by_length` (resolved by smop.fast_path):
        evaluation batches likewise, longest first (`LengthSortedSampler`). `pad_to_multiple_of`: a batch's width
        rounded up to it (resolved by smop.fast_path; masks and -100 labels cover the padding)."""
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"Unknown dataset.source '{source}'; allowed: {', '.join(SOURCES)}")
        if max_length <= prompt_length + 1:
            raise ValueError(
                f"dataset.max_length={max_length} leaves no room for the input after a {prompt_length}-token prompt"
            )
        self.task = Task(
            name,
            choose_template(name, template, templates, template_style),
            list(label_words),
            list(label_names or []),
            list(metrics or ["accuracy"]),
            truncate_field,
            list(fields or []),
            format,
            target,
            list(number_range or [0.0, 5.0]),
            label_field,
            target_field,
            no_answer_text,
            target_template,
            truncate_side,
        )
        if (max_target_length is None) != (target not in GENERATED):
            raise ValueError(
                f"dataset.max_target_length={max_target_length} for {name} (target={target}): a text target needs "
                "one, as a code target does (tokens, EOS included); label and number targets take the length of their "
                "longest target text"
            )
        if target != "code" and (decoding or sandbox):
            raise ValueError(
                f"dataset.decoding and dataset.sandbox are a code target's (sampled, executed); {name} has "
                f"target={target}, decoded greedily"
            )
        self.decoding, self.sandbox = dict(decoding or {}), dict(sandbox or {})
        samples = self.decoding.get("num_return_sequences", 1)
        too_many = [m for m in self.task.metrics if target == "code" and int(m.split("@")[1]) > samples]
        if too_many:
            raise ValueError(
                f"metric(s) {too_many} of {name} need more samples than dataset.decoding.num_return_sequences="
                f"{samples}: pass@k needs k <= n"
            )
        if max_target_length is not None and (isinstance(max_target_length, bool) or max_target_length < 1):
            raise ValueError(f"dataset.max_target_length={max_target_length} for {name}: give an integer >= 1")
        self.text_target_length = max_target_length
        check_train_targets(train_targets, name, target)
        self.train_targets = train_targets
        check_official(official_files, official_format, name)
        self.official_files, self.official_format = official_files, official_format
        self.split_names = {**DEFAULT_SPLITS, **{k: v for k, v in dict(splits or {}).items() if v}}
        unknown = sorted(set(self.split_names) - set(SPLIT_ROLES))
        if unknown:
            raise ValueError(f"dataset.splits has {unknown}; it names the hub file of: {', '.join(SPLIT_ROLES)}")
        named = None if source == "synthetic" else set(self.split_names)
        check_protocol(split_protocol, named, name, official_ranges)
        self.split_protocol, self.dept_split = split_protocol, dept_split
        self.split_files, self.sample_folder = dict(split_files or {}), sample_folder
        self.official_ranges, self.id_field = (dict(official_ranges) if official_ranges else None), id_field
        check_k_shot(k_shot, name, target, format)
        self.k_shot = k_shot
        check_max_train_records(max_train_records)
        self.max_train_records = max_train_records
        self.split_info: dict[str, Any] = {}
        self.tokenizer = tokenizer
        # a separate encoder's own tokenizer (IDPG/LoPA with method.encoder=<model>): batches then carry its ids too
        self.encoder_tokenizer = encoder_tokenizer
        self.source, self.data_dir, self.hub_name, self.hub_config = source, data_dir, hub_name, hub_config
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.causal = causal
        self.budget = max_length - prompt_length - (self.max_target_length if causal else 0)
        if self.budget < 1:
            raise ValueError(
                f"dataset.max_length={max_length} leaves no room for the input after a {prompt_length}-token prompt "
                f"and the {self.max_target_length}-token target of a causal LM"
            )
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.synthetic = dict(synthetic or {})
        self.seed = seed
        if not isinstance(group_by_length, bool):
            raise ValueError(f"dataset.group_by_length={group_by_length!r}: give true or false")
        self.group_by_length = group_by_length
        if not isinstance(sort_eval_by_length, bool):
            raise ValueError(f"dataset.sort_eval_by_length={sort_eval_by_length!r}: give true, false or auto")
        self.sort_eval_by_length = sort_eval_by_length
        self._resume: dict[str, int] | None = None
        self.pad_to_multiple_of = pad_to_multiple_of
        self.splits: dict[str, list[dict[str, Any]]] = {}

    @property
    def max_target_length(self) -> int:
        """Tokens of the longest target text (a label word, or a number of the task's range), EOS included: the
        generation length at evaluation. A text target's is its config value (`dataset.max_target_length`)."""
        if self.text_target_length is not None:
            return self.text_target_length
        return max(len(ids) for ids in target_ids(self.tokenizer, self.task.target_texts(), self.causal))

    def _raw(self, role: str) -> list[dict[str, Any]]:
        """The records of the hub file with this role (train, validation, ...)."""
        if self.source == "synthetic":  # its train and test sets, generated
            options = dict(self.synthetic)
            count = options.pop("num_train" if role == "train" else "num_test")
            options.pop("num_test" if role == "train" else "num_train", None)
            seed = self.split_seed + (0 if role == "train" else 1_000_003)
            return synthetic_mixture(count, seed=seed, **options)
        if role not in self.split_names:
            raise ValueError(f"{self.task.name} names no {role} file (dataset.splits.{role})")
        split_name = self.split_names[role]
        aliases = file_aliases(self.split_files, split_name)
        return load_split_records(
            self.task,
            self.source,
            self.data_dir,
            self.hub_name,
            self.hub_config,
            split_name,
            aliases,
            self.sample_folder,
            self.official_files,
            self.official_format,
        )

    def _smop_rows(self, train: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """SMoP's 90/10 split of the training file: stratified per label (a number or text target: one stratum)."""
        multirc = self.task.format == "multirc"  # split by paragraph: no question spans two splits
        one = self.task.target in ("number", *GENERATED) or multirc
        strata = [0 if one else raw_label(self.task, r) for r in train]
        return smop_split(strata, units(train, multirc), self.val_fraction, self.split_seed)

    def setup(self, stage: str | None = None) -> None:
        """Read, split, flatten and tokenize once; every later stage reuses it."""
        if self.splits:
            return
        protocol = "smop" if self.source == "synthetic" else self.split_protocol  # generated: its own test set
        named = set(self.split_names)
        multirc = self.task.format == "multirc"
        id_of = (lambda record: numeric_id(record[self.id_field])) if self.id_field else None
        parts = divide(
            protocol,
            self.dept_split,
            self._raw,
            named,
            self.task.name,
            self._smop_rows,
            multirc,
            self.official_ranges,
            id_of,
        )
        with_test_alt(parts, named, self._raw)
        parts["train"] = capped_part(parts["train"], self.max_train_records)
        if self.k_shot is not None:  # after the protocol's split: validation and test stay whole
            label_of = partial(raw_label, self.task)  # WinoGrande's class is its `answer`
            parts["train"] = k_shot_part(parts["train"], self.k_shot, self.seed, self.task.name, label_of)
        raw = {split: part.records for split, part in parts.items()}
        for split, records in raw.items():
            examples = list(flatten(self.task, records))
            if not examples:  # split_protocol=lopa's validation set
                self.splits[split] = []
                continue
            if split == "train" and self.train_targets == "each":  # a row per gold; evaluation: one per example
                examples = list(each_gold(examples))
            inputs = encode(self.task, self.tokenizer, examples, self.budget, self.causal)
            texts = [self.task.target_text(ex) for ex in examples]
            distinct = list(dict.fromkeys(texts))  # label words: a few texts for every row, tokenized once each
            encoded = dict(zip(distinct, target_ids(self.tokenizer, distinct, self.causal), strict=True))
            targets = [encoded[text] for text in texts]
            if self.text_target_length is not None:  # a long summary: its first tokens and the EOS, as generated
                eos, length = self.tokenizer.eos_token_id, self.text_target_length
                targets = [truncate_target(ids, length, eos) for ids in targets]
            self.splits[split] = [
                {"input_ids": ids, "labels": target, "label_index": ex["label"], "group": ex["group"]}
                for ids, target, ex in zip(inputs, targets, examples, strict=True)
            ]
            if self.task.target != "labels":  # the gold value, every gold text (scored by max), or the problem
                key = {"number": "value", "text": "golds", "code": "problem"}[self.task.target]
                for row, ex in zip(self.splits[split], examples, strict=True):
                    row[key] = ex[key]
            for name, sequences in self.extra_ids(examples).items():
                for row, ids in zip(self.splits[split], sequences, strict=True):
                    row[name] = ids
        examples = {split: len(rows) for split, rows in self.splits.items()}
        self.split_info = describe(protocol, parts, examples, self.k_shot, self.max_train_records)

    @property
    def validates(self) -> bool:
        """Whether there is a validation set (split_protocol=lopa has none: the final checkpoint is tested)."""
        return bool(self.splits.get("val"))

    def extra_ids(self, examples: list[dict[str, Any]]) -> dict[str, list[list[int]]]:
        """The id sequences besides the backbone's that the method reads, per example, by field name (`*input_ids`):
        a separate encoder's own ids (IDPG/LoPA with method.encoder=<model>). `collate` pads each with its mask."""
        if self.encoder_tokenizer is None:
            return {}
        return {"encoder_input_ids": self.encoder_ids(examples)}

    def extra_pad_id(self, name: str) -> int:
        """The padding id of an extra sequence field (the mask hides the padding whatever its id)."""
        tokenizer = self.encoder_tokenizer if name == "encoder_input_ids" else self.tokenizer
        return (tokenizer.pad_token_id if tokenizer is not None else None) or 0

    def encoder_ids(self, examples: list[dict[str, Any]]) -> list[list[int]]:
        """The formatted examples as the separate encoder's tokenizer reads them. A long one keeps its END, as in the
        reference: `encoder_tokenizer` truncates on the left at the encoder's limit, special tokens kept."""
        texts = [self.task.template.format(**example) for example in examples]
        tokenizer = self.encoder_tokenizer
        return tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length).input_ids

    def extra_features(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """What a batch of these raw examples carries besides the backbone's ids (labelling new inputs)."""
        columns = self.extra_ids(examples)
        return self.pad_extra(
            [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        )

    def pad_extra(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Each extra id sequence of the rows (a `<prefix>input_ids` field other than `input_ids`) padded to its
        longest row, with its `<prefix>attention_mask`: whatever a method declares, collated the same way."""
        batch = {}
        for name in [key for key in (rows[0] if rows else {}) if key.endswith("input_ids") and key != "input_ids"]:
            sequences = [torch.tensor(row[name], dtype=torch.long) for row in rows]
            padded = pad_sequence(sequences, batch_first=True, padding_value=self.extra_pad_id(name))
            lengths = torch.tensor([len(sequence) for sequence in sequences])
            batch[name] = padded
            batch[name.removesuffix("input_ids") + "attention_mask"] = (
                torch.arange(padded.shape[1]) < lengths[:, None]
            ).long()
        return batch

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad to the longest row of this batch, not to max_length (rounded up to `pad_to_multiple_of`)."""
        inputs = [torch.tensor(row["input_ids"]) for row in rows]
        input_ids = pad_sequence(inputs, batch_first=True, padding_value=self.tokenizer.pad_token_id)
        labels = pad_sequence([torch.tensor(row["labels"]) for row in rows], batch_first=True, padding_value=-100)
        input_ids = pad_width(input_ids, self.pad_to_multiple_of, self.tokenizer.pad_token_id)
        labels = pad_width(labels, self.pad_to_multiple_of, -100)
        lengths = torch.tensor([len(x) for x in inputs])
        batch = {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(),
            "labels": labels,
            "label_index": torch.tensor([row["label_index"] for row in rows]),
            "group": torch.tensor([row["group"] for row in rows]),
        }
        if "value" in rows[0]:  # a number target's gold value
            batch["value"] = torch.tensor([row["value"] for row in rows], dtype=torch.float)
        if "golds" in rows[0]:  # a text target's gold texts: a list of lists of strings (Lightning moves tensors only)
            batch["golds"] = [list(row["golds"]) for row in rows]
        if "problem" in rows[0]:  # a code target's raw records, which its generations are run against
            batch["problems"] = [row["problem"] for row in rows]
        batch.update(self.pad_extra(rows))
        return batch

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, split: str, batch_size: int, sampler: DistributedSampler) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # its own generator: starting an iterator must not draw from the global RNG (router noise), or a
            # resumed run, which starts its iterators at other moments, would draw other noise
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch) alone, not by the global RNG: a resumed run sees the same order as an
        uninterrupted one, and N ranks with batch b see the batches of one process with batch N*b (also with
        group_by_length)."""
        world, rank = self._world()
        rows = self.splits["train"]
        lengths = [len(row["input_ids"]) for row in rows] if self.group_by_length else None
        sampler = ResumableSampler(
            rows,
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=self.seed,
            lengths=lengths,
            batch_size=self.batch_size,
        )
        if self._resume is not None:
            sampler.resume(self._resume["epoch"], self._resume["batches"] * self.batch_size)
            self._resume = None
        return self._loader("train", self.batch_size, sampler)

    def state_dict(self) -> dict[str, int]:
        """How far the current epoch got, so that a mid-epoch checkpoint resumes at the next batch."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return {"epoch": trainer.current_epoch, "batches": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state) if state else None

    def _eval_loader(self, split: str) -> DataLoader:
        """Each rank evaluates its own share, and no example twice (DistributedSampler would pad with repeats); in
        file order, or longest first (dataset.sort_eval_by_length)."""
        world, rank = self._world()
        rows = self.splits[split]
        if self.sort_eval_by_length:
            sampler = LengthSortedSampler(rows, num_replicas=world, rank=rank)
        else:
            sampler = UnrepeatedDistributedSampler(rows, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(split, self.eval_batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The test set, and the task's other validation file when the protocol does not validate on it (MNLI's
        mismatched: `test_alt`, the module's second test dataloader)."""
        if "test_alt" in self.splits:
            return [self._eval_loader("test"), self._eval_loader("test_alt")]
        return self._eval_loader("test")
