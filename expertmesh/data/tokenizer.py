"""Tokenizers: bytes (the default, vocabulary 256) or a byte-level BPE from the `tokenizers` library,
trained here on the training split or loaded from a JSON file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from expertmesh.config import ConfigError


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        data = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        return torch.from_numpy(data.astype(np.int64))

    def decode(self, ids) -> str:
        # ids past 255 (a model vocabulary larger than the bytes) have no text
        return bytes(i for i in map(int, ids) if 0 <= i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    def __init__(self, tok) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        if not Path(path).is_file():
            raise ConfigError(f"data.tokenizer_path {str(path)!r} does not exist")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # the library raises its own exception types
            raise ConfigError(f"data.tokenizer_path {str(path)!r} is not a tokenizers JSON file: {e}") from None

    @classmethod
    def train(cls, text: str, vocab_size: int, save_to: Path) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        chunk = 1 << 16
        tok.train_from_iterator((text[i: i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
        save_to.parent.mkdir(parents=True, exist_ok=True)
        tmp = save_to.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(save_to)
        return cls(tok)

    def encode(self, text: str) -> torch.Tensor:
        chunk = 1 << 16  # encode in chunks: one huge string is slow and memory-hungry
        ids: list[int] = []
        for enc in self._tok.encode_batch([text[i: i + chunk] for i in range(0, len(text), chunk)]):
            ids.extend(enc.ids)
        return torch.tensor(ids, dtype=torch.int64)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` as written (no special tokens added) and each token's character span."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])
