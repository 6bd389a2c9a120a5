"""A trained SentencePiece model with the ids training, data preparation and chat formatting need.

Training the model (with the Baichuan 2 settings) is a tool, :mod:`haina.tools.tokenizer`; reading one is
needed everywhere (data preparation, alignment data, generation), so it lives here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm

from haina.core.errors import ConfigError, InputFileError

if TYPE_CHECKING:
    from haina.core.config import HainaConfig

SPACE = "\u2581"


class Tokenizer:
    """A trained SentencePiece model with the ids training and chat formatting need.

    ``encode`` never adds bos/eos: the data pipeline decides where documents end. Text holding the
    literal character ``▁`` (which SentencePiece would turn into a space) is encoded with byte pieces for
    it, so decode(encode(s)) == s for every string.
    """

    def __init__(
        self,
        model: Path | str,
        *,
        user_token: str = "<reserved_106>",
        assistant_token: str = "<reserved_107>",
    ) -> None:
        model = Path(model)
        if not model.is_file():
            raise InputFileError(f"{model}: tokenizer model not found")
        self.path = model
        self._sp = spm.SentencePieceProcessor(model_file=str(model))
        self._user_token = user_token
        self._assistant_token = assistant_token
        space_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE.encode("utf-8")]
        self._space_ids = space_bytes if all(self._sp.is_byte(i) for i in space_bytes) else None

    # ------------------------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """-1: the model has no pad piece; batches pad with eos and mask the loss."""
        return self._sp.pad_id()

    def _special(self, piece: str) -> int:
        token = self._sp.piece_to_id(piece)
        if token == self.unk_id and piece != self._sp.id_to_piece(self.unk_id):
            raise InputFileError(f"{self.path}: tokenizer has no {piece!r} piece")
        return token

    @property
    def user_id(self) -> int:
        return self._special(self._user_token)

    @property
    def assistant_id(self) -> int:
        return self._special(self._assistant_token)

    def is_byte(self, token: int) -> bool:
        return self._sp.is_byte(int(token))

    def id_to_piece(self, token: int) -> str:
        return self._sp.id_to_piece(int(token))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    # ---------------------------------------------------------------------------------- text
    def encode(self, text: str) -> list[int]:
        if self._space_ids is None or SPACE not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE)):
            if i:
                ids.extend(self._space_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Many documents at once on all cores (SentencePiece's own thread pool); same ids as encode."""
        texts = list(texts)
        plain = [i for i, t in enumerate(texts) if self._space_ids is None or SPACE not in t]
        out: list[list[int]] = [[] for _ in texts]
        if plain:
            encoded = self._sp.encode([texts[i] for i in plain], num_threads=num_threads)
            for i, ids in zip(plain, encoded, strict=True):
                out[i] = ids
        if len(plain) != len(texts):
            plain_set = set(plain)
            for i, text in enumerate(texts):
                if i not in plain_set:
                    out[i] = self.encode(text)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def tokenizer_path(cfg: HainaConfig, override: str | Path | None = None) -> str | Path | None:
    """The SentencePiece model a run uses: ``override`` (``--tokenizer``), else ``align.tokenizer``, else
    ``data.tokenizer`` (an HF export's own ``tokenizer.model``)."""
    return override or cfg.align.tokenizer or cfg.data.tokenizer


def load_tokenizer(cfg: HainaConfig, override: str | Path | None = None) -> Tokenizer:
    """The run's tokenizer with its chat role tokens (see :func:`tokenizer_path`)."""
    path = tokenizer_path(cfg, override)
    if path is None:
        raise ConfigError("align.tokenizer: no SentencePiece model named (set align.tokenizer or data.tokenizer)")
    return Tokenizer(path, user_token=cfg.tokenizer.user_token, assistant_token=cfg.tokenizer.assistant_token)
