"""Tokenizers for decoding: Hugging Face `tokenizer.json` (the `tokenizers` library) or a
SentencePiece model. Neither imports TensorFlow; seqio's vocabulary wrapper stays in
`jaxaccel.data`. Files are read as bytes through the path object given (a `pathlib.Path`
or an etils `epath.Path` for gs://), never by file name, so object-store models keep their
tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from jaxaccel.errors import ModelLoadError, first_line

# The files transformers reads beside a vocabulary (special tokens, BOS behaviour, chat
# template): read with the tokenizer when its folder has them and written by its `save`
# unchanged, so a model carried HF -> jaxaccel -> HF keeps them.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _side_files(path) -> dict[str, bytes]:
    found = {}
    for name in SIDE_FILES:
        try:
            if (path.parent / name).is_file():
                found[name] = (path.parent / name).read_bytes()
        except OSError:  # unreadable: the vocabulary is what decoding needs
            pass
    return found


def _save_side_files(tokenizer, folder) -> None:
    for name, data in tokenizer.side_files.items():
        (folder / name).write_bytes(data)


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def piece(self, token_id: int) -> str: ...

    def save(self, folder: Path) -> None: ...


class HFTokenizer:
    """`tokenizer.json`; `encode` applies its post-processor (e.g. a BOS token)."""

    filename = "tokenizer.json"

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        self.path = _as_path(path)
        self._tok = _Tok.from_str(self.path.read_bytes().decode("utf-8"))  # JSON is UTF-8, whatever the locale
        self.side_files = _side_files(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, as stored (e.g. with its word-start marker)."""
        return self._tok.id_to_token(int(token_id)) or ""

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, folder: Path) -> None:
        (folder / self.filename).write_bytes(self._tok.to_str().encode("utf-8"))
        _save_side_files(self, folder)


class SentencePieceTokenizer:
    """A SentencePiece `.model`; `add_bos` prepends its BOS id when it has one."""

    filename = "tokenizer.model"

    def __init__(self, path: str | Path, add_bos: bool = False):
        import sentencepiece as spm

        self.path = _as_path(path)
        self._proto = self.path.read_bytes()
        if not self._proto:  # refused here: sentencepiece would log to stderr before failing
            raise ValueError("the file is empty")
        self.side_files = _side_files(self.path)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = self._sp.get_piece_size()
        self.add_bos = add_bos

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(text)
        if self.add_bos and self._sp.bos_id() >= 0:
            ids = [self._sp.bos_id()] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; ids past the model's pieces (a model whose embedding table is
        padded beyond its tokenizer can sample them) decode to nothing, as HFTokenizer's do."""
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, as stored ("\u2581" marks a word start); "" for an
        id past the pieces."""
        return self._sp.id_to_piece(int(token_id)) if 0 <= int(token_id) < self.vocab_size else ""

    @property
    def eos_id(self) -> int | None:
        return self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def save(self, folder: Path) -> None:
        (folder / self.filename).write_bytes(self._proto)
        _save_side_files(self, folder)


def continuation_text(tokenizer: Tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text `new_ids` add after `prompt_ids`: the two decoded together, minus the prompt's
    own text (what transformers' text-generation pipeline returns). Decoded apart, a tokenizer
    that marks word starts (SentencePiece's "\u2581", HF Metaspace / Llama decoders) drops the
    space before the first new word, so prompt + text glues two words. Prompt ids cut inside
    a multi-byte character (byte pieces) decode alone to a trailing U+FFFD: the continuation
    then starts with that whole character, as the joint text has it. When the joint text
    does not begin with the prompt's at all, the new ids decoded alone."""
    head = tokenizer.decode(list(prompt_ids))
    full = tokenizer.decode(list(prompt_ids) + list(new_ids))
    while not full.startswith(head) and head.endswith("\ufffd"):  # (a U+FFFD of the prompt's own text stays)
        head = head[:-1]
    return full[len(head):] if full.startswith(head) else tokenizer.decode(list(new_ids))


def load_tokenizer(folder: str | Path, add_bos: bool = False) -> Tokenizer | None:
    """The tokenizer stored in a model folder, or None when it has none."""
    folder = _as_path(folder)
    for cls, kwargs in ((HFTokenizer, {}), (SentencePieceTokenizer, {"add_bos": add_bos})):
        path = folder / cls.filename
        if path.is_file():
            try:
                tok = cls(path, **kwargs)
            except Exception as e:  # sentencepiece / tokenizers raise their own types on a bad file
                raise ModelLoadError(f"{path}: not a valid tokenizer file ({first_line(e)})") from None
            if tok.vocab_size < 1:
                raise ModelLoadError(f"{path}: the tokenizer has no pieces")
            return tok
    return None


def _as_path(path):
    """A path object as given (pathlib or epath), or a pathlib.Path for a string."""
    return path if hasattr(path, "read_bytes") else Path(path)
