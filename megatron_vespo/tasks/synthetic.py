"""The built-in verifiable task: answer with characters of the class the prompt names.

Prompt (text): "<class>:<tag>>", e.g. "even:q7x2c>" or "vowel:3kd>". The class is one of

    even  -> 0 2 4 6 8        odd  -> 1 3 5 7 9
    vowel -> a e i o u        op   -> + - * / %

and the tag is random letters/digits that make prompts distinct (its length makes every prompt
text 11 characters, so every prompt is 12 tokens with <bos>). Training prompt i names class
i mod 4, so each block of 4 consecutive prompts covers all classes.

Answer: the response tokens before the first <eos> (or all of them if the engine stopped at the
token limit), n of them. With H = the number of answer tokens in the class and K = answer_length:

    reward = min(H, K) / max(K, n)      in [0, 1]

Every answer token moves the reward (dense credit); exactly K in-class tokens and then <eos> gives
1.0; a longer answer is diluted (16 in-class tokens without <eos> give K/16), a shorter one earns
at most n/K. The reward depends on the prompt: the right class is only known from the prompt.

Random policy. A freshly initialised model is close to uniform over its V output ids. Under the
uniform policy each token is <eos> with probability e = 1/V, else one of the other V - 1 ids, in
the class with probability p = 5 / (V - 1). With at most L new tokens, the answer length n is
geometric truncated at L: P(n = k) = (1 - e)^k e for k < L, P(n = L) = (1 - e)^L, and given n,
H ~ Binomial(n, p). Hence

    E[reward] = sum_{k=0..L} P(n = k) * E[min(H_k, K)] / max(K, k)

which `uniform_policy_reward` evaluates exactly. For V = 64, L = 16, K = 8 it is 0.0740, just
below p = 0.079: an answer that runs to the limit scores about H / L ~ p, a shorter one less. A
tiny model therefore starts near 0.07 and can climb towards 1.

Train and eval prompts come from disjoint seed streams, and also disjoint texts: a prompt text
whose CRC32 is divisible by 8 may only appear in the eval set, any other only in training.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from math import comb
from typing import Any, Iterator, Sequence

import numpy as np

from .base import Prompt, cut_at_eos
from .eval_sets import EvalSet, EvalSetConfig

CLASSES: dict[str, frozenset[str]] = {
    "even": frozenset("02468"),
    "odd": frozenset("13579"),
    "vowel": frozenset("aeiou"),
    "op": frozenset("+-*/%"),
}
CLASS_NAMES = tuple(CLASSES)
CLASS_SIZE = 5
PROMPT_CHARS = 11  # "<class>:<tag>>": len(class) + 1 + len(tag) + 1
TAG_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
# Stream ids inside the seed: training and eval prompts never share a random stream.
TRAIN_STREAM, EVAL_STREAM = 0, 1
EVAL_HASH_MODULUS = 8


@dataclass(frozen=True)
class SyntheticConfig:
    """answer_length: K, the number of in-class tokens a perfect answer has before <eos>."""

    answer_length: int = 8

    def __post_init__(self) -> None:
        if self.answer_length < 1:
            raise ValueError(f"answer_length must be >= 1, got {self.answer_length}")


def synthetic_reward(target: str, answer: Sequence[str], answer_length: int) -> float:
    """min(H, K) / max(K, n) for an answer of n tokens (each a string), H of them single characters
    of class `target`, K = answer_length. A str works as a sequence of characters."""
    if target not in CLASSES:
        raise ValueError(f"target={target!r} is unknown; allowed: {list(CLASS_NAMES)}")
    hits = sum(1 for token in answer if token in CLASSES[target])
    return min(hits, answer_length) / max(answer_length, len(answer))


def uniform_policy_reward(vocab_size: int, max_new_tokens: int, answer_length: int) -> float:
    """E[reward] when every response token is drawn uniformly from `vocab_size` ids, one of which
    is <eos> and 5 of which are the target class (the formula of the module docstring)."""
    if vocab_size < CLASS_SIZE + 1 or max_new_tokens < 0 or answer_length < 1:
        raise ValueError("need vocab_size >= 6, max_new_tokens >= 0, answer_length >= 1")
    e, p = 1.0 / vocab_size, CLASS_SIZE / (vocab_size - 1)
    total = 0.0
    for k in range(max_new_tokens + 1):
        p_len = (1 - e) ** k * (e if k < max_new_tokens else 1.0)
        mean_capped_hits = sum(comb(k, h) * p ** h * (1 - p) ** (k - h) * min(h, answer_length)
                               for h in range(k + 1))
        total += p_len * mean_capped_hits / max(answer_length, k)
    return total


def _is_eval_text(text: str) -> bool:
    return zlib.crc32(text.encode()) % EVAL_HASH_MODULUS == 0


def synthetic_prompt_text(seed: int, index: int, split: str) -> tuple[str, str]:
    """(prompt text, target class) of prompt `index` of `split` ("train" | "eval"); deterministic."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; allowed: ['train', 'eval']")
    want_eval = split == "eval"
    target = CLASS_NAMES[index % len(CLASS_NAMES)]
    rng = np.random.default_rng([seed, EVAL_STREAM if want_eval else TRAIN_STREAM, index])
    tag_length = PROMPT_CHARS - len(target) - 2
    while True:  # about 1 draw in 8 (train) or 8 draws (eval) until the text is on its side
        tag = "".join(TAG_ALPHABET[i] for i in rng.integers(0, len(TAG_ALPHABET), tag_length))
        text = f"{target}:{tag}>"
        if _is_eval_text(text) == want_eval:
            return text, target


class SyntheticTask:
    """The synthetic task over a tokenizer (the tiny character tokenizer is the intended one: with
    another, each response token is one answer unit, in the class only if it is one class char)."""

    def __init__(self, tokenizer: Any, config: SyntheticConfig, seed: int, eval_size: int,
                 eval_sets: Sequence[EvalSetConfig] = (EvalSetConfig("heldout"),)):
        self.tokenizer, self.config, self.seed, self.eval_size = tokenizer, config, seed, eval_size
        self.sets = tuple(eval_sets)
        self._next_index = 0
        self._eos = tokenizer.eos_token_id
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self._token_text = list(vocab)

    def _prompt(self, index: int, split: str) -> Prompt:
        text, target = synthetic_prompt_text(self.seed, index, split)
        ids = self.tokenizer(text).input_ids
        return Prompt(index, list(ids), {"task": "synthetic", "split": split, "index": index,
                                         "target": target, "prompt": text})

    def train_prompts(self) -> Iterator[Prompt]:
        """Endless; group_id = prompt index, continuing from the cursor (see state_dict)."""
        while True:
            index = self._next_index
            self._next_index += 1
            yield self._prompt(index, "train")

    def eval_sets(self) -> list[EvalSet]:
        """Every set scores the first eval_size (or its `limit`) generated held-out prompts."""
        prompts = [self._prompt(i, "eval") for i in range(self.eval_size)]
        return [EvalSet(s, prompts[:s.limit]) for s in self.sets]

    def reward(self, metadata: dict[str, Any], response_ids: Sequence[int]) -> float:
        """Score the response token ids (up to the first <eos>) against metadata['target']."""
        # An id the tokenizer does not know (a model vocabulary larger than the tokenizer's) is
        # one answer unit that is in no class.
        answer = [self._token_text[i] if 0 <= i < len(self._token_text) else "" for i in
                  cut_at_eos(response_ids, self._eos)]
        return synthetic_reward(metadata["target"], answer, self.config.answer_length)

    def rewards(self, metadata: Sequence[dict[str, Any]],
                response_ids: Sequence[Sequence[int]]) -> list[float]:
        return [self.reward(m, r) for m, r in zip(metadata, response_ids)]

    def state_dict(self) -> dict[str, Any]:
        return {"task": "synthetic", "seed": self.seed, "next_index": self._next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("task") != "synthetic" or state.get("seed") != self.seed:
            raise ValueError(f"cannot resume the synthetic task (seed {self.seed}) from {state!r}")
        self._next_index = int(state["next_index"])

    def close(self) -> None:
        """Nothing to stop."""
