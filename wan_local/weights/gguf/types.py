"""The GGML storage types a GGUF file may use for its tensors (ids as in GGUF files), without importing torch:
the byte accounting of the planner needs the sizes long before any model loads."""

from __future__ import annotations

from dataclasses import dataclass

QK_K = 256  # values per K-quant super-block
#: Values dequantized per step (`quants.dequantize`): bounds its float32 temporaries whatever the tensor's size.
#: On the CPU a step stays near the caches; on a GPU larger steps mean fewer kernel launches (an A14B FFN weight
#: of 70.8 M values takes 5 steps instead of 17).
CHUNK_VALUES = 1 << 22
CUDA_CHUNK_VALUES = 1 << 24
#: Bytes those temporaries take at most (a few float32 copies of one GPU step), besides the output.
DEQUANT_TEMP_BYTES = 4 * 4 * CUDA_CHUNK_VALUES
DENSE_NAMES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class GGMLType:
    """One GGML storage type: its id in GGUF files, name, values per block and bytes per block."""

    type_id: int
    name: str
    block_size: int
    type_size: int

    @property
    def quantized(self) -> bool:
        return self.name not in DENSE_NAMES

    def nbytes(self, numel: int) -> int:
        """Bytes `numel` values take in this format (numel a multiple of block_size)."""
        return numel // self.block_size * self.type_size


GGML_TYPES: dict[int, GGMLType] = {
    t.type_id: t
    for t in (
        GGMLType(0, "F32", 1, 4),
        GGMLType(1, "F16", 1, 2),
        GGMLType(2, "Q4_0", 32, 18),
        GGMLType(3, "Q4_1", 32, 20),
        GGMLType(6, "Q5_0", 32, 22),
        GGMLType(7, "Q5_1", 32, 24),
        GGMLType(8, "Q8_0", 32, 34),
        GGMLType(10, "Q2_K", QK_K, 84),
        GGMLType(11, "Q3_K", QK_K, 110),
        GGMLType(12, "Q4_K", QK_K, 144),
        GGMLType(13, "Q5_K", QK_K, 176),
        GGMLType(14, "Q6_K", QK_K, 210),
        GGMLType(30, "BF16", 1, 2),
    )
}
GGML_BY_NAME = {t.name: t for t in GGML_TYPES.values()}
