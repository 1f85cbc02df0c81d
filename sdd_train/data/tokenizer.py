"""SentencePiece tokenizers: training (BPE or unigram) with lossless settings, and a thin wrapper.

Settings keep every character: identity normalisation, whitespace preserved (code indentation),
no dummy prefix, byte fallback for anything unseen (newlines become the byte piece <0x0A>).
So ``decode(encode(text)) == text`` for any UTF-8 text. Id 0 is ``<unk>``, id 1 is EOS.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from sdd_train.data.sources import DataError

UNK_ID, EOS_ID = 0, 1


def _sentences(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """Lines of the documents (sentencepiece trains on lines), cut at ``max_chars`` characters."""
    for doc in documents:
        for line in doc.split("\n"):
            if line:
                yield line[:max_chars]


def train_tokenizer(documents: Iterable[str], prefix: Path, vocab_size: int, model_type: str = "bpe",
                    byte_fallback: bool = True, special_tokens: tuple[str, ...] = (),
                    max_sentences: int = 300_000, threads: int | None = None) -> Path:
    """Train on streamed documents; writes ``prefix.model`` and ``prefix.vocab`` atomically.

    sentencepiece samples ``max_sentences`` lines (reservoir sampling), so memory stays bounded.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix.with_name(prefix.name + ".partial")
    max_chars = 16384
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(documents, max_chars),
            model_prefix=str(tmp_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            user_defined_symbols=list(special_tokens),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=max_chars * 4,  # bytes
            num_threads=threads or os.cpu_count() or 1,
            unk_id=UNK_ID,
            eos_id=EOS_ID,
            bos_id=-1,
            pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"tokenizer training failed: {' '.join(str(e).split())}"
                         " (too little text for this vocab_size? lower it)") from None
    model = prefix.with_suffix(".model")
    Path(str(tmp_prefix) + ".model").replace(model)
    Path(str(tmp_prefix) + ".vocab").replace(prefix.with_suffix(".vocab"))
    return model


def file_fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class Tokenizer:
    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise DataError(f"{model_file}: tokenizer model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise DataError(f"{model_file}: not a readable SentencePiece model ({' '.join(str(e).split())}); pass"
                            " a .model file written by 'sdd-data tokenizer' or sentencepiece") from None
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise DataError(f"{model_file}: the tokenizer has no EOS piece; train one with eos_id set"
                            " (sdd-data tokenizer does)")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        return file_fingerprint(self.model_file)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def encode_documents(self, docs: list[str], threads: int = 1) -> list[list[int]]:
        """Encode documents, each followed by EOS."""
        return [ids + [self.eos_id] for ids in self.sp.encode(docs, num_threads=threads)]
