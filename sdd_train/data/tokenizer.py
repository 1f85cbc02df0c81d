"""SentencePiece tokenizer: training with lossless settings, and a thin wrapper for encoding.

Settings keep every character: identity normalisation, whitespace preserved (code indentation),
no dummy prefix, byte fallback for anything unseen (newlines become the byte piece <0x0A>).
So ``decode(encode(text)) == text`` for any UTF-8 text.
"""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm

UNK_ID, EOS_ID = 0, 1


def train_tokenizer(inputs: list[Path], prefix: Path, vocab_size: int, model_type: str = "bpe",
                    max_sentences: int = 300_000, threads: int | None = None) -> Path:
    """Train a tokenizer on text files (one sentence per line); writes ``prefix.model`` atomically."""
    prefix = Path(prefix)
    tmp_prefix = prefix.with_name(prefix.name + ".partial")
    spm.SentencePieceTrainer.train(
        input=",".join(str(p) for p in inputs),
        model_prefix=str(tmp_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        num_threads=threads or os.cpu_count() or 1,
        unk_id=UNK_ID,
        eos_id=EOS_ID,
        bos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    model = prefix.with_suffix(".model")
    Path(str(tmp_prefix) + ".model").replace(model)
    Path(str(tmp_prefix) + ".vocab").replace(prefix.with_suffix(".vocab"))
    return model


class Tokenizer:
    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.eos_id = self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def encode_documents(self, docs: list[str]) -> list[list[int]]:
        """Encode documents, each followed by EOS."""
        return [ids + [self.eos_id] for ids in self.sp.encode(docs, num_threads=os.cpu_count() or 1)]
