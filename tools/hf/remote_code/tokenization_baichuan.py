"""The SentencePiece tokenizer of a Baichuan-layout export, for ``AutoTokenizer.from_pretrained(dir,
trust_remote_code=True)``.

Shipped by ``haina export hf --format baichuan`` beside ``tokenizer.model``; imports only sentencepiece,
transformers and the standard library, so it runs without haina. Text encodes to the ids haina's own
tokenizer gives: SentencePiece's pieces as they are (haina's models add no dummy prefix and do no
normalization), no bos/eos unless ``add_bos_token`` / ``add_eos_token`` ask, and the literal character ``▁``
(which SentencePiece would read as a space) as its UTF-8 byte pieces, so decoding gives the text back.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
SPACE = "\u2581"


class BaichuanTokenizer(PreTrainedTokenizer):
    """A trained SentencePiece model; special tokens are its own <unk>, <s>, </s> pieces."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        sp_model_kwargs: dict[str, Any] | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        # The SentencePiece model must exist before the base class runs: it asks for the vocabulary.
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)
        self._space_pieces = self._byte_pieces(SPACE)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def _byte_pieces(self, char: str) -> list[str] | None:
        """The byte-fallback pieces of ``char``, or None when the model has no byte pieces."""
        pieces = [f"<0x{b:02X}>" for b in char.encode("utf-8")]
        if all(self.sp_model.is_byte(self.sp_model.piece_to_id(p)) for p in pieces):
            return pieces
        return None

    # SentencePiece processors cannot be pickled; carry the serialized model instead.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["_sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        proto = state.pop("_sp_model_proto")
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.LoadFromSerializedProto(proto)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if self._space_pieces is None or SPACE not in text:
            return self.sp_model.encode(text, out_type=str)
        pieces: list[str] = []
        for i, part in enumerate(text.split(SPACE)):
            if i:
                pieces.extend(self._space_pieces)
            if part:
                pieces.extend(self.sp_model.encode(part, out_type=str))
        return pieces

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """SentencePiece's decoding of each run of ordinary pieces; special tokens kept as their text
        (SentencePiece would decode its control pieces to nothing)."""
        special = set(self.all_special_tokens)
        out: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in special:
                out.append(self.sp_model.decode_pieces(run))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode_pieces(run))
        return "".join(out)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out += bos + token_ids_1 + eos
        return out

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """All zeros: a decoder-only model has no segment embedding."""
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary: {save_directory} is not a directory")
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        target = os.path.join(save_directory, name)
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(target):
                shutil.copyfile(self.vocab_file, target)
        else:
            with open(target, "wb") as out:
                out.write(self.sp_model.serialized_model_proto())
        return (target,)
