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

This module also owns the pre-tokenizer table (PRE_TOKENIZERS) and the GGUF
vocabulary -> tokenizers.Tokenizer builder (bpe_tokenizer) that quantkit.export
uses to write tokenizer.json (``hf=True``).

BOS is prepended when the model adds it (tokenizer.ggml.add_bos_token).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UnsupportedError
from ..model import ModelStream

# The one owner of GGUF byte-level BPE vocabulary -> tokenizers.Tokenizer (calibration
# here, the tokenizer.json quantkit.export writes).
#
# Each regex in two spellings that differ only on case-folded letters such as U+017F
# (measured: "it'\u017f" splits as "'\u017f" with (?i:'s), as "'", "\u017f" with '[sS]):
#   llama: llama.cpp's src/llama-vocab.cpp, used to tokenize (calibration, perplexity);
#   hf:    the family's HF tokenizer.json, written by export so a round trip keeps its bytes.
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """How a tokenizer.ggml.pre splits text before BPE (data, not code)."""
    digits: bool  # Digits(individual_digits=True) first
    split: str | None  # llama.cpp's regex: Split(regex, "isolated") before a regex-free ByteLevel; None: ByteLevel's GPT-2 regex
    hf_split: str | None  # the same regex as the family's tokenizer.json spells it
    ignore_merges: bool  # the family's BPE option (a vocab word is one token even if no merge reaches it)
    nfc: bool  # the family's tokenizer.json has an NFC normalizer
    reason: str


# tokenizer.ggml.pre -> its pre-tokenizer. Export writes these four (each checked against
# llama.cpp's ids in tests/test_export.py); PRE_ALIASES are other names llama.cpp gives them.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "smollm": PreTokenizer(True, None, None, False, False, "SmolLM: digits one by one, then GPT-2's byte-level regex"),
    "gpt-2": PreTokenizer(False, None, None, False, False, "GPT-2: byte-level regex only"),
    "llama-bpe": PreTokenizer(False, _LLAMA3, _LLAMA3_HF, True, False, "Llama 3: digits in threes, ignore_merges"),
    "qwen2": PreTokenizer(False, _QWEN2, _QWEN2_HF, False, True, "Qwen2: single digits, NFC in tokenizer.json"),
}
PRE_ALIASES: dict[str, str] = {
    "default": "gpt-2",  # no tokenizer.ggml.pre: llama.cpp's default BPE pre-tokenizer is GPT-2's
    "llama3": "llama-bpe",  # llama.cpp's LLAMA3 pre-type has both names
    "qwen35": "qwen2",  # llama.cpp tokenizes Qwen3.5 with Qwen2's regex
}


def pre_tokenizer(spec: PreTokenizer, hf: bool = False):
    """tokenizers pre-tokenizer for ``spec``: llama.cpp's regex spelling, or (``hf``)
    the object the family's tokenizer.json holds (same ids; offsets and regex spelling
    as HF writes them)."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    split = spec.hf_split if hf else spec.split
    parts = []
    if spec.digits:
        parts.append(pt.Digits(individual_digits=True))
    if split:
        parts.append(pt.Split(Regex(split), behavior="isolated", invert=False))
    if hf:
        parts.append(pt.ByteLevel(add_prefix_space=False, trim_offsets=not split, use_regex=not split))
        return parts[0] if len(parts) == 1 else pt.Sequence(parts)
    parts.append(pt.ByteLevel(add_prefix_space=False, use_regex=not split))
    return pt.Sequence(parts)


def bpe_tokenizer(tokens: list[str], merges: list[str], pre: str, where: str, *, types: list[int] | None = None,
                  hf: bool = False):
    """tokenizers.Tokenizer for a GGUF byte-level BPE vocabulary (tokenizer.ggml.model
    "gpt2") with tokenizer.ggml.pre ``pre``.

    hf=False (calibration): llama.cpp's tokenization of plain text: every token in the
    BPE vocabulary, no added tokens (common_tokenize with parse_special=false), aliases
    of ``pre`` accepted. hf=True (export): the family's tokenizer.json: UNUSED ids
    ("[PAD<i>]" fillers) left out, CONTROL/UNKNOWN as special and USER_DEFINED as added
    tokens, the BPE option and normalizer of the family, ByteLevel post-processor; a
    duplicated token is an error."""
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer as HFTok, decoders, models, processors

    name = pre if hf else PRE_ALIASES.get(pre, pre)
    spec = PRE_TOKENIZERS.get(name)
    if spec is None:
        names = PRE_TOKENIZERS if hf else sorted([*PRE_TOKENIZERS, *PRE_ALIASES])
        raise UnsupportedError(
            f"{where}: BPE pre-tokenizer {pre!r} cannot be exported yet; supported: {', '.join(names)}" if hf else
            f"{where}: BPE pre-tokenizer {pre!r} is not supported (supported: {', '.join(names)})")
    vocab: dict[str, int] = {}
    added: list[tuple[int, str, bool]] = []
    if hf:
        types = [TokenType.NORMAL] * len(tokens) if types is None else types
        for i, (tok, tt) in enumerate(zip(tokens, types)):
            if tt == TokenType.UNUSED:
                continue  # llama.cpp's converter writes "[PAD<i>]" for ids missing from the vocab
            if tok in vocab:
                raise InputError(f"{where}: token {tok!r} appears twice in the vocabulary (ids {vocab[tok]} and {i})")
            vocab[tok] = i
            if tt in (TokenType.CONTROL, TokenType.UNKNOWN):
                added.append((i, tok, True))
            elif tt == TokenType.USER_DEFINED:
                added.append((i, tok, False))
    else:
        vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise InputError(f"{where}: malformed BPE merge {m!r}")
        pairs.append((parts[0], parts[1]))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None, fuse_unk=False,
                         byte_fallback=False, ignore_merges=spec.ignore_merges and hf)
    except Exception as e:  # tokenizers' own error type, e.g. a merge of unknown tokens
        raise InputError(f"{where}: the BPE vocabulary is inconsistent: {e}") from None
    tk = HFTok(bpe)
    if hf and spec.nfc:
        from tokenizers import normalizers

        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizer(spec, hf)
    if hf:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    for i, tok, special in added:  # ids are kept: these tokens are already in the vocab
        at = AddedToken(tok, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tk.add_special_tokens if special else tk.add_tokens)([at])
    return tk


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


def tokenizer_from_stream(stream: ModelStream):
    """A tokenizers.Tokenizer from the GGUF vocabulary in ``stream``'s metadata."""
    kind = stream.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedError(
            f"calibration tokenizer: GGUF vocabulary type {kind!r} is not supported here "
            "(byte-level BPE 'gpt2' is); calibrate from the HF checkpoint (tokenizer.json/.model) instead")
    tokens = list(stream.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise InputError("model has no tokenizer.ggml.tokens")
    return bpe_tokenizer(tokens, list(stream.get("tokenizer.ggml.merges") or []),
                         str(stream.get("tokenizer.ggml.pre", "default") or "default"), "calibration tokenizer")


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
