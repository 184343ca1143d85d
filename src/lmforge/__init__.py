"""lmforge: train small LLaMA-family language models from raw text to a Hugging Face export."""

__version__ = "0.1.0"
