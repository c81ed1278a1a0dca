"""GGUF files (city96/ComfyUI-GGUF conventions, fact sheet §3.4): `reader` parses the container over mmap (headers
without data), `quants` dequantizes the GGML block formats in torch, `dit` turns a file into official-named
tensors for the DiT. Import from the module that defines a name.
"""
