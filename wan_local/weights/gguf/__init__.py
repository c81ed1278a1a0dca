"""GGUF files (city96/ComfyUI-GGUF conventions, fact sheet §3.4): `reader` parses the container over mmap (headers
without data), `types` / `quants` name and dequantize the GGML block formats (in torch), `dit` turns a file into
official-named tensors for the DiT, `umt5` reads a `t5encoder` file as transformers-named UMT5 weights and
`tokenizer` rebuilds the sentencepiece model such a file carries. Import from the module that defines a name.
"""
