"""Weight-only int8 / fp8 storage for the DiT blocks' Linears, attached from outside the model.

`numerics`: which Linears, the quantize / dequantize maths, `QuantLinear` and its FP8 GEMM. `formats`: quantized
state dicts (ours, ComfyUI scaled-fp8, optimum-quanto) and building / loading a DiT with QuantLinear layers.
`cache`: `QuantCache`, the on-disk copy of on-the-fly quantization. Import from the module that defines a name.
"""
