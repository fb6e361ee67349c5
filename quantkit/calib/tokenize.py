"""Tokenize calibration text with the model's own tokenizer, as llama.cpp's
common_tokenize(text, add_special=true, parse_special=false) does:

- HF directory: its tokenizer.json (``tokenizers``), special tokens not parsed,
  or its tokenizer.model (SentencePiece) when there is no tokenizer.json --
  NOTE: sentencepiece's own normalization is not llama.cpp's SPM tokenizer
  (e.g. newlines): tokens differ (measured: 9881 vs 11178 on 20 kB of pydoc
  text), so calibration works but is not token-identical to llama-imatrix;
- GGUF (or any ModelStream): a ``tokenizers`` BPE rebuilt from the GGUF vocabulary
  (byte-level BPE vocabularies, tokenizer.ggml.model == "gpt2"), with the
  pre-tokenizer llama.cpp uses for tokenizer.ggml.pre.

BOS is prepended when the model adds it (tokenizer.ggml.add_bos_token).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UnsupportedError
from ..model import ModelStream

# llama.cpp src/llama-vocab.cpp: pre-tokenizer regexes per tokenizer.ggml.pre.
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# pre name -> list of pre-tokenizer steps (data, not code)
PRE_TOKENIZERS: dict[str, list[tuple[str, object]]] = {
    "smollm": [("digits", True), ("bytelevel_regex", None)],
    "gpt-2": [("bytelevel_regex", None)],
    "default": [("bytelevel_regex", None)],
    "llama-bpe": [("split", _LLAMA3)],
    "llama3": [("split", _LLAMA3)],
    "qwen2": [("split", _QWEN2)],
    "qwen35": [("split", _QWEN2)],
}


@dataclass
class Tokenizer:
    tok: object  # tokenizers.Tokenizer
    add_bos: bool
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=False).ids)
        if self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids


class _SentencePiece:
    """tokenizer.model (SentencePiece) with the ``tokenizers`` calls used here."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise InputError(f"{path}: cannot load ({e})") from None

    def encode(self, text: str, add_special_tokens: bool = False):
        from types import SimpleNamespace

        return SimpleNamespace(ids=self.sp.encode(text))

    def token_to_id(self, piece: str):
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt

    steps = PRE_TOKENIZERS.get(pre)
    if steps is None:
        raise UnsupportedError(
            f"calibration tokenizer: BPE pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    seq = []
    for kind, arg in steps:
        if kind == "digits":
            seq.append(pt.Digits(individual_digits=bool(arg)))
        elif kind == "bytelevel_regex":
            seq.append(pt.ByteLevel(add_prefix_space=False, use_regex=True))
        elif kind == "split":
            seq.append(pt.Split(Regex(arg), behavior="isolated", invert=False))
    if steps[-1][0] != "bytelevel_regex":
        seq.append(pt.ByteLevel(add_prefix_space=False, use_regex=False))
    return pt.Sequence(seq)


def tokenizer_from_stream(stream: ModelStream):
    """A tokenizers.Tokenizer from the GGUF vocabulary in ``stream``'s metadata."""
    from tokenizers import Tokenizer as HFTok, decoders, models

    kind = stream.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedError(
            f"calibration tokenizer: GGUF vocabulary type {kind!r} is not supported here "
            "(byte-level BPE 'gpt2' is); calibrate from the HF checkpoint (tokenizer.json/.model) instead")
    tokens = list(stream.get("tokenizer.ggml.tokens") or [])
    merges = list(stream.get("tokenizer.ggml.merges") or [])
    if not tokens:
        raise InputError("model has no tokenizer.ggml.tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=False)
    tk = HFTok(bpe)
    tk.pre_tokenizer = _pre_tokenizer(str(stream.get("tokenizer.ggml.pre", "default") or "default"))
    tk.decoder = decoders.ByteLevel()
    return tk


def load_tokenizer(stream: ModelStream | None, src: str | os.PathLike | None = None) -> Tokenizer:
    """The model's tokenizer: tokenizer.json when ``src`` is an HF directory
    that has one, else rebuilt from the GGUF vocabulary in ``stream``."""
    tk = None
    if src is not None and not isinstance(src, ModelStream):
        p = Path(src)
        if p.is_dir() and (p / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTok

            try:
                tk = HFTok.from_file(str(p / "tokenizer.json"))
            except Exception as e:
                raise InputError(f"{p / 'tokenizer.json'}: cannot load ({e})") from None
        elif p.is_dir() and (p / "tokenizer.model").is_file():
            tk = _SentencePiece(p / "tokenizer.model")
    add_bos = bool(stream.get("tokenizer.ggml.add_bos_token", False)) if stream is not None else False
    bos = stream.get("tokenizer.ggml.bos_token_id") if stream is not None else None
    if tk is None:
        if stream is None:
            raise InputError("no tokenizer: give an HF directory with tokenizer.json or a GGUF file")
        tk = tokenizer_from_stream(stream)
    elif stream is None or "tokenizer.ggml.add_bos_token" not in stream.metadata:
        cfg = Path(src) / "tokenizer_config.json"
        if cfg.is_file():
            c = json.loads(cfg.read_text(encoding="utf-8"))
            add_bos = bool(c.get("add_bos_token", False))
            bt = c.get("bos_token")
            bt = bt.get("content") if isinstance(bt, dict) else bt
            if bos is None and bt is not None:
                bos = tk.token_to_id(bt)
    return Tokenizer(tk, add_bos=add_bos, bos_id=None if bos is None else int(bos))
