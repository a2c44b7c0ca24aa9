"""The study's verifiable task: a digit substitution cipher with an exact-match reward.

Prompt "<bos>dddd=" (always 6 tokens: <bos>, a zero-padded 4-digit number and "="), answer the
same four digits each mapped through a fixed secret permutation of 0-9, then <eos>; e.g. with
CIPHER = 7294081536, "0193=" -> "7264<eos>". The reward is 1 when the response is exactly those
four digits followed by <eos>, else 0. Tokens are ids of the project's tiny character tokenizer
(`tasks/tiny_tokenizer.py`), so the policy's vocabulary is its 64 ids.

Why this task: the policy must both carry the digits through its state and apply a mapping it
can only learn from the reward, and exact match on 4 digits is sparse enough that a warm-started
policy samples the right answer only a few percent of the time. A tiny GRU reaches 10-40% held-out
accuracy after a few dozen supervised steps, and RL takes it from there in minutes on one core.

Held-out split: the 10,000 numbers are split by a fixed multiplicative hash; about 1 in 8 is held
out and never appears as a training prompt, so held-out accuracy measures generalisation.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from megatron_vespo.tasks.tiny_tokenizer import BOS, EOS, PAD, build_tiny_tokenizer

DIGITS = 4
PROMPT_LEN = DIGITS + 2  # <bos>, the digits, "="
MAX_NEW_TOKENS = DIGITS + 1  # the mapped digits and <eos>
CIPHER = "7294081536"  # digit d maps to CIPHER[d]
HELD_OUT_MODULUS = 8
_NUM_ITEMS = 10 ** DIGITS


class CipherTask:
    """Ids of the tiny tokenizer and the train / held-out split (deterministic). Items are the
    numbers 0..9999 as an int64 array."""

    @cached_property
    def vocab(self) -> dict[str, int]:
        return dict(build_tiny_tokenizer().get_vocab())

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return self.vocab[PAD]

    @property
    def eos_id(self) -> int:
        return self.vocab[EOS]

    @cached_property
    def _held_out(self) -> np.ndarray:
        """[10000] bool per number (Knuth's multiplicative hash spreads the held-out numbers)."""
        idx = np.arange(_NUM_ITEMS, dtype=np.uint64)
        return ((idx * np.uint64(2654435761)) >> np.uint64(7)) % np.uint64(HELD_OUT_MODULUS) == 0

    def train_items(self, count: int, seed: int) -> np.ndarray:
        """[count] training numbers, drawn with replacement from the train side."""
        return np.random.default_rng([seed, 0]).choice(np.flatnonzero(~self._held_out), size=count)

    def held_out_items(self, count: int) -> np.ndarray:
        """[count] the first `count` held-out numbers in a fixed shuffled order."""
        return np.random.default_rng([12345, 1]).permutation(np.flatnonzero(self._held_out))[:count]

    def _encode(self, texts: list[str]) -> Tensor:
        return torch.tensor([[self.vocab[ch] for ch in t] for t in texts], dtype=torch.long)

    def prompts(self, items: np.ndarray) -> Tensor:
        """[P, PROMPT_LEN] int64 prompt ids."""
        bos = torch.full((len(items), 1), self.vocab[BOS], dtype=torch.long)
        return torch.cat([bos, self._encode([f"{int(v):0{DIGITS}d}=" for v in items])], dim=1)

    def answers(self, items: np.ndarray) -> Tensor:
        """[P, MAX_NEW_TOKENS] int64 the correct response: the mapped digits and <eos>."""
        mapped = ["".join(CIPHER[int(c)] for c in f"{int(v):0{DIGITS}d}") for v in items]
        eos = torch.full((len(items), 1), self.eos_id, dtype=torch.long)
        return torch.cat([self._encode(mapped), eos], dim=1)

    def reward(self, responses: Tensor, items: np.ndarray) -> Tensor:
        """[P] float32 exact-match reward of responses [P, MAX_NEW_TOKENS]."""
        return (responses == self.answers(items)).all(dim=1).float()
