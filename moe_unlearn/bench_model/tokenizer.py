"""A small byte-level BPE tokenizer trained on the fictitious-facts corpus.

Byte-level BPE round-trips any text exactly (decode(encode(t)) == t), and with a vocabulary
of ~1K most invented names of the corpus become one or two tokens, so answers are short.
It is returned as a transformers `PreTrainedTokenizerFast` and saves with `save_pretrained`.
No special token is added automatically: callers append `eos_token` where a text ends.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moe_unlearn.errors import BadInputError

PAD, EOS, BOS = "<|pad|>", "<|endoftext|>", "<|bos|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `vocab_size` tokens (3 special tokens included) on `texts`."""
    texts = list(texts)
    if not texts:
        raise BadInputError("train_tokenizer needs at least one text")
    if vocab_size < 260:
        raise BadInputError(f"vocab_size must be >= 260 (256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                   clean_up_tokenization_spaces=False)


__all__ = ["BOS", "EOS", "PAD", "train_tokenizer"]
