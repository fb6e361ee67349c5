"""Hub repo ids ("org/name", "org/name@revision") -> a local snapshot directory.

Resolution goes through huggingface_hub's cache. The cache location and
offline mode are read from the environment at call time (HF_HUB_CACHE, then
HUGGINGFACE_HUB_CACHE, then $HF_HOME/hub, then ~/.cache/huggingface/hub;
HF_HUB_OFFLINE), so they can change after huggingface_hub was imported.
The cache is always tried first; only when the repo is not there and we are
not offline is it downloaded (model weights, config and tokenizer files only).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InputError

REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*(?:@[\w.\-/]+)?$")

# What convert needs from a repo (never other GGUFs, images, training state...).
ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
]

_TRUE = {"1", "on", "yes", "true"}


def looks_like_repo_id(src: str) -> bool:
    return bool(REPO_ID.match(src)) and not src.endswith((".gguf", ".json", ".safetensors", ".bin"))


def hub_cache_dir() -> Path:
    env = os.environ
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(k):
            return Path(env[k]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def is_offline(offline: bool | None = None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def split_revision(src: str) -> tuple[str, str | None]:
    if "@" in src:
        repo, rev = src.split("@", 1)
        return repo, rev or None
    return src, None


def resolve_repo(src: str, *, offline: bool | None = None) -> Path:
    """Local snapshot directory of hub repo ``src``; InputError when not found."""
    from huggingface_hub import snapshot_download

    repo_id, revision = split_revision(src)
    cache = hub_cache_dir()
    off = is_offline(offline)
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                      allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # LocalEntryNotFoundError, incomplete snapshot, bad cache ...
        cached_err = e
    if off:
        raise InputError(
            f"{src!r} is not a local path and not in the Hugging Face cache at {cache} "
            f"(offline: HF_HUB_OFFLINE is set); download it first or give a local directory"
        ) from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:
        raise InputError(
            f"{src!r} is not a local path and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; cache: {type(cached_err).__name__})"
        ) from None
