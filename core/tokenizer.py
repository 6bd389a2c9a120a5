"""A trained SentencePiece model with the ids training, data preparation and chat formatting need.

Training the model (with the Baichuan 2 settings) is a tool, :mod:`haina.tools.tokenizer`; reading one is
needed everywhere (data preparation, alignment data, generation), so it lives here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm

from haina.core.errors import ConfigError, InputFileError, one_line

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
        field: str | None = None,
    ) -> None:
        """``field``: where the path was named (``data.tokenizer``), put before the file in error messages."""
        model = Path(model)
        where = f"{field}: {model}" if field else str(model)
        if not model.is_file():
            raise InputFileError(f"{where}: tokenizer model not found")
        self.path = model
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model))
        except (RuntimeError, OSError) as exc:  # sentencepiece's parse failure is a bare RuntimeError
            raise InputFileError(f"{where}: not a SentencePiece model ({one_line(exc)})") from None
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


def tokenizer_source(cfg: HainaConfig, override: str | Path | None = None) -> tuple[str, str | Path] | None:
    """(where it is named, path) of the SentencePiece model a run uses: ``override`` (``--tokenizer``),
    else ``align.tokenizer``, else ``data.tokenizer`` (an HF export's own ``tokenizer.model``)."""
    for where, path in (("--tokenizer", override), ("align.tokenizer", cfg.align.tokenizer),
                        ("data.tokenizer", cfg.data.tokenizer)):
        if path:
            return where, path
    return None


def tokenizer_path(cfg: HainaConfig, override: str | Path | None = None) -> str | Path | None:
    """The path of :func:`tokenizer_source`, or None."""
    source = tokenizer_source(cfg, override)
    return None if source is None else source[1]


def load_tokenizer(cfg: HainaConfig, override: str | Path | None = None) -> Tokenizer:
    """The run's tokenizer with its chat role tokens (see :func:`tokenizer_source`)."""
    source = tokenizer_source(cfg, override)
    if source is None:
        raise ConfigError("align.tokenizer: no SentencePiece model named (set align.tokenizer or data.tokenizer)")
    where, path = source
    return Tokenizer(path, user_token=cfg.tokenizer.user_token, assistant_token=cfg.tokenizer.assistant_token,
                     field=where)


def check_tokenizers(cfg: HainaConfig) -> list[str]:
    """Refuse, before any work, a tokenizer the config names that cannot be read or that has more pieces
    than the model has embedding rows (``model.vocab_size``): its ids past the last row would otherwise stop
    training mid-way with torch's ``IndexError: index out of range in self``.

    Every tokenizer field is checked, not only the one this algorithm reads: ``data.tokenizer`` made the
    pretraining data and is the one an export ships, ``align.tokenizer`` encodes the alignment data, and
    both feed ids to the same embedding. Fewer pieces than rows is allowed (a model sized up for a
    tensor-parallel split, or for tokens to come); the unused rows come back as notes, which the training
    loop prints once the run has started (so a refusal later in the checks stays the only line).
    """
    rows = cfg.model.vocab_size
    seen: set[str] = set()
    notes: list[str] = []
    for field, path in (("data.tokenizer", cfg.data.tokenizer), ("align.tokenizer", cfg.align.tokenizer)):
        if path is None or path in seen:
            continue
        seen.add(path)
        pieces = Tokenizer(path, field=field).vocab_size
        if pieces > rows:
            raise ConfigError(
                f"{field}: {path} has {pieces} pieces but model.vocab_size is {rows}: ids {rows}..{pieces - 1} "
                f"have no embedding row (set model.vocab_size to at least {pieces}, or use a smaller tokenizer)"
            )
        if pieces < rows:
            notes.append(f"{field} {path} has {pieces} pieces for model.vocab_size {rows}: "
                         f"{rows - pieces} embedding rows are never used")
    return notes
