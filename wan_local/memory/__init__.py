"""The low-VRAM engine: residency planning, block streaming, quantization, tiling and estimates.

Memory policy attaches to the models from outside (wrappers and removable hooks); the model files know nothing
of it.
"""
