"""Hugging Face interop: the LLaMA layout of the decoder, the tokenizer, safetensors files,
and `python -m mile_jax.hf export|import` (`convert.py`).

Nothing is imported here: `layout`, `tokenizer` and `safetensors_io` sit below the
config and the training loop, while `convert` builds on the training loop.
"""
