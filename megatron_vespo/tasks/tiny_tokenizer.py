"""The embedded default's tokenizer: one token per character, 64 ids, built locally.

Nothing is downloaded: the vocabulary is four special tokens, the ten digits, the 26 lower-case
letters and 24 punctuation characters, one id each. A character outside it encodes as <unk>.
Encoding prepends <bos>; decoding joins the characters with no separator. The saved directory
(tokenizer.json + tokenizer_config.json + special_tokens_map.json) loads with
`transformers.AutoTokenizer.from_pretrained(dir)`, which is how the rollout server and the tasks
read it. A tiny model trained with it should have `vocab_size` = TINY_VOCAB_SIZE, so that every id
the model can sample is a character of this vocabulary.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Chosen so that the whole vocabulary is exactly 64 ids: 4 + 10 + 26 + 24.
PUNCTUATION = " .,:;!?=+-*/()[]{}<>_'#%"
CHARACTERS = string.digits + string.ascii_lowercase + PUNCTUATION
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)
assert TINY_VOCAB_SIZE == 64 and len(set(CHARACTERS)) == len(CHARACTERS)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer as a transformers fast tokenizer (ids: <pad>=0, <bos>=1,
    <eos>=2, <unk>=3, then the characters in the order of CHARACTERS)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Every character is its own piece; "(?m)" is Oniguruma's dot-matches-newline, so a newline
    # becomes one <unk> instead of being dropped.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    core.decoder = decoders.Fuse()  # "a", "b" -> "ab", not "a b"
    # Marked special so that decode(skip_special_tokens=True) drops them.
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, model_max_length=4096)


def save_tiny_tokenizer(directory: str | os.PathLike) -> Path:
    """Write the tokenizer files into `directory` (created if needed); returns the directory.

    tokenizer_config.json is written here rather than by save_pretrained so that its
    tokenizer_class is the one every transformers version knows (PreTrainedTokenizerFast).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().backend_tokenizer.save(str(directory / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
              "clean_up_tokenization_spaces": False, **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return directory
