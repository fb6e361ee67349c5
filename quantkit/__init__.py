"""quantkit: Hugging Face checkpoint -> quantized GGUF, bit-exact with llama.cpp."""

__version__ = "0.1.0"
