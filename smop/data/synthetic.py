"""A synthetic mixture task generated in code, built so that routing should help.

Each input is a string of characters drawn from one of several disjoint character ranges (one token
per character with the byte-level tokenizer); the range decides the label. A single short prompt must
serve every range at once; a mixture can give each range its own prompt.
"""

from __future__ import annotations

import random
import string
from typing import Any

ALPHABET = string.ascii_lowercase


def character_ranges(num_ranges: int) -> list[str]:
    """Split the alphabet into `num_ranges` disjoint, equally sized ranges."""
    if not 1 <= num_ranges <= len(ALPHABET) // 2:
        raise ValueError(f"synthetic num_ranges={num_ranges} must be between 1 and {len(ALPHABET) // 2}")
    size = len(ALPHABET) // num_ranges
    return [ALPHABET[i * size : (i + 1) * size] for i in range(num_ranges)]


def synthetic_mixture(
    num_examples: int,
    num_ranges: int = 2,
    num_labels: int = 2,
    min_length: int = 8,
    max_length: int = 20,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Seeded records {"text", "label", "range"}; range r gets label r % num_labels."""
    rng = random.Random(seed)
    ranges = character_ranges(num_ranges)
    records = []
    for _ in range(num_examples):
        which = rng.randrange(num_ranges)
        text = "".join(rng.choice(ranges[which]) for _ in range(rng.randint(min_length, max_length)))
        records.append({"text": text, "label": which % num_labels, "range": which})
    return records
