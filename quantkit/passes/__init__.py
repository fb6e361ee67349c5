"""Passes: ModelStream -> ModelStream, without loading tensors.

    from quantkit.passes import replicate
    stream = replicate.apply(stream, layer_map="0:20,12:30", repeat=None)

Only layer replication (experimental) exists so far.
"""
from . import replicate  # noqa: F401

__all__ = ["replicate"]
