"""A tiny word-level tokenizer for tests (no hub access): words "w0".."wN" plus special tokens."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def word_tokenizer(num_words: int = 120, *, with_pad: bool = True) -> PreTrainedTokenizerFast:
    """Ids: 0 <unk>, 1 <eos>, 2 <pad> (if with_pad), then w0, w1, ... (ids < num_words + 3 < vocab 128)."""
    specials = ["<unk>", "<eos>"] + (["<pad>"] if with_pad else [])
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in range(num_words):
        vocab[f"w{w}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = dict(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    if with_pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(**kwargs)
