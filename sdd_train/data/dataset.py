"""A prepared dataset opened for reading: its metadata checked, its shards memory-mapped.

The shards of a split read as one token sequence; a training instance is the window
``[i * seq_len, i * seq_len + seq_len + 1)`` of it (inputs and shifted targets), so instances
do not overlap and may cross document (and shard) boundaries, separated by EOS.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdd_train.data.sources import DataError
from sdd_train.data.tokenizer import Tokenizer


class TokenSplit:
    """One split (train or val) of a prepared dataset as a virtual concatenation of memmapped shards."""

    def __init__(self, root: Path, split: dict, dtype: np.dtype):
        self.arrays: list[np.ndarray] = []
        for shard in split["shards"]:
            path = root / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not path.is_file():
                raise DataError(f"{path}: shard listed in metadata.json is missing; re-run sdd-data prepare")
            if path.stat().st_size != expected:
                raise DataError(f"{path}: corrupt or truncated shard ({path.stat().st_size} bytes, expected"
                                f" {expected}); delete it and its units/*.json marker, then re-run sdd-data prepare")
            self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])
        self.documents = split["documents"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            local = start + filled - int(self.offsets[shard])
            piece = self.arrays[shard][local:local + length - filled]
            out[filled:filled + piece.size] = piece
            filled += piece.size
            shard += 1
        return out

    def n_instances(self, seq_len: int) -> int:
        return max(0, (len(self) - 1) // seq_len)

    def instance(self, index: int, seq_len: int) -> np.ndarray:
        return self.read(index * seq_len, seq_len + 1)


class PreparedDataset:
    def __init__(self, path: str | Path):
        self.root = Path(path)
        meta_file = self.root / "metadata.json"
        if not meta_file.is_file():
            raise DataError(f"{self.root}: not a prepared dataset (no metadata.json); run sdd-data prepare first,"
                            " or finish an interrupted one by re-running it")
        try:
            self.meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_file}: corrupt metadata ({e.msg}); re-run sdd-data prepare") from None
        self.dtype = np.dtype(self.meta["dtype"])
        self.tokenizer = Tokenizer(self.root / self.meta["tokenizer"]["file"])
        if self.tokenizer.fingerprint != self.meta["tokenizer"]["fingerprint"]:
            raise DataError(f"{self.root / 'tokenizer.model'}: does not match the tokenizer the shards were made"
                            " with (fingerprint differs); re-prepare the dataset")
        self.train = TokenSplit(self.root, self.meta["splits"]["train"], self.dtype)
        self.val = TokenSplit(self.root, self.meta["splits"]["val"], self.dtype)

    @property
    def vocab_size(self) -> int:
        return self.meta["tokenizer"]["vocab_size"]

    @property
    def fingerprint(self) -> str:
        return f"{self.meta['source_fingerprint']}-{self.meta['tokenizer']['fingerprint']}"
