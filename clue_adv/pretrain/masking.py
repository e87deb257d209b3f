"""Batches for masked-language-model training: a seeded order, dynamic padding, BERT's masking.

Everything random here is a function of (seed, batch number), not of a generator's history: a run resumed at step k
sees exactly the batches and masks an uninterrupted run sees from step k on, with no random state to save.

BERT's masking (Devlin et al. 2019; google-research/bert create_pretraining_data.py): in each text, choose
round(p · n) of its n maskable tokens (at least one; [CLS], [SEP] and padding are never chosen) uniformly as targets;
replace a target by [MASK] with probability 0.8, by a random token with 0.1, keep it with 0.1. The loss is computed
at the targets only. (Hugging Face's DataCollatorForLanguageModeling draws each token independently with probability
p instead, so a short text may get no target; the 80/10/10 split is the same.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from clue_adv.data import LengthGroupedSampler
from clue_adv.errors import ClueAdvError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from clue_adv.pretrain.config import MaskingConfig

IGNORE = -100  # the label of a position that is not a target (PyTorch's cross-entropy ignore_index)


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from parts such as (run seed, "mask", batch number): independent streams without shared state."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator_for(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


class BatchOrder:
    """Which texts form batch `b`, counting batches over the whole run: epoch `b // len(self)` is a permutation drawn
    from (seed, epoch), optionally sorted by length inside windows of 50 batches (little padding), cut into batches
    in order; an epoch's last batch may be smaller."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, length_grouped: bool) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.length_grouped = length_grouped
        self._epoch: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            generator = generator_for(self.seed, "order", epoch)
            if self.length_grouped:
                order = list(LengthGroupedSampler(self.lengths, 50 * self.batch_size, generator))
            else:
                order = torch.randperm(len(self.lengths), generator=generator).tolist()
            self._epoch = (epoch, order)
        return self._epoch[1]

    def epoch_of(self, batch: int) -> int:
        return batch // len(self)

    def indices(self, batch: int) -> list[int]:
        start = (batch % len(self)) * self.batch_size
        return self._order(self.epoch_of(batch))[start : start + self.batch_size]


def pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the right to the longest sequence (dynamic padding)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


class Masker:
    """BERT's masking for one tokenizer: `masker(input_ids, attention_mask, generator)` -> (inputs, labels), labels
    holding the original token at each target and IGNORE elsewhere."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, spec: MaskingConfig) -> None:
        if tokenizer.mask_token_id is None:
            raise ClueAdvError(f"the tokenizer ({tokenizer.name_or_path}) has no mask token; MLM needs one")
        self.spec = spec
        self.mask_id = int(tokenizer.mask_token_id)
        special = sorted(set(tokenizer.all_special_ids))
        self.special_ids = torch.tensor(special, dtype=torch.long)
        # A random replacement is a real token: a random [SEP] or [PAD] would teach nothing about the language.
        keep = torch.ones(len(tokenizer), dtype=torch.bool)
        keep[self.special_ids] = False
        self.random_ids = keep.nonzero().flatten()

    def candidates(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions that may be chosen: real tokens that are not special."""
        return attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        candidates = self.candidates(input_ids, attention_mask)
        available = candidates.sum(1)
        # round() in float64, half to even as Python's round() in BERT's own code; at least one, at most all
        wanted = torch.round(available.double() * self.spec.probability).long().clamp(min=1)
        wanted = torch.minimum(wanted, available)
        # A uniform choice of `wanted` candidates per row: the ranks of random scores, non-candidates ranked last.
        scores = torch.rand(input_ids.shape, generator=generator).masked_fill(~candidates, 2.0)
        rank = scores.argsort(dim=1).argsort(dim=1)
        targets = rank < wanted[:, None]
        labels = input_ids.masked_fill(~targets, IGNORE)
        draw = torch.rand(input_ids.shape, generator=generator)
        to_mask = targets & (draw < self.spec.replace_mask)
        to_random = targets & ~to_mask & (draw < self.spec.replace_mask + self.spec.replace_random)
        inputs = input_ids.masked_fill(to_mask, self.mask_id)
        picks = torch.randint(len(self.random_ids), (int(to_random.sum()),), generator=generator)
        inputs[to_random] = self.random_ids[picks]
        return inputs, labels
