"""GGUF files: the container reader, dequantization of every GGML format, and the DiT's tensor table and bytes.

Independent references: gguf-py (the GGUF project's own Python package) writes the files and decodes the blocks;
the shapes of a real A14B expert come from the fact sheet (§2.8, §3.4), not from our byte accounting.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import rel_l2
from gguf import GGMLQuantizationType as Q
from gguf_files import (
    a14b_i2v_q4_k_m_tensors,
    official_dit_sd,
    quantize_q4_k,
    quantize_q5_k,
    quantize_q6_k,
    write_gguf_dit,
    write_gguf_header_only,
)

from wan_local.errors import CheckpointError
from wan_local.memory.bytes import model_bytes_from_tensors
from wan_local.specs import get_task
from wan_local.weights.gguf.quants import GGML_BY_NAME, dequantize
from wan_local.weights.gguf.reader import read_gguf
from wan_local.weights.headers import checked_dit_config, dit_tensor_table, read_dit_config
from wan_local.weights.loading import dit_config_from_official

# Offsets of the fp16 fields of each block (d, dmin, m): random bytes there could be inf / NaN.
FP16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def _random_blocks(name: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes for `n_blocks` blocks of `name`, with finite fp16 scale fields."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, GGML_BY_NAME[name].type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[name]:
        blocks[:, offset : offset + 2] = rng.normal(size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize("name", sorted(FP16_FIELDS))
def test_dequantize_matches_gguf_py(name: str) -> None:
    """Every block format decodes bit for bit as gguf-py's numpy reference (float32), cast once to bf16."""
    ggml = GGML_BY_NAME[name]
    n_blocks = (3 * gguf.quants.QK_K) // ggml.block_size * 5 + 1  # not a multiple of any chunk or row
    blocks = _random_blocks(name, n_blocks, seed=ggml.type_id)
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, Q[name]).reshape(-1))
    shape = (n_blocks, ggml.block_size)
    ours = dequantize(torch.from_numpy(blocks), ggml, shape, torch.float32)
    assert torch.equal(ours.reshape(-1), expected)
    as_bf16 = dequantize(torch.from_numpy(blocks), ggml, shape, torch.bfloat16)
    assert torch.equal(as_bf16.reshape(-1), expected.bfloat16())


def test_dequantize_in_chunks_and_dense_types(monkeypatch) -> None:
    """Chunked decoding writes every block once; F32 / F16 / BF16 are reinterpreted as gguf-py reads them."""
    from wan_local.weights.gguf import quants

    blocks = _random_blocks("Q6_K", 7, seed=1)
    whole = dequantize(torch.from_numpy(blocks), GGML_BY_NAME["Q6_K"], (7, 256), torch.float32)
    monkeypatch.setattr(quants, "CHUNK_VALUES", 512)  # 2 blocks per step, the last step short
    assert torch.equal(dequantize(torch.from_numpy(blocks), GGML_BY_NAME["Q6_K"], (7, 256), torch.float32), whole)

    values = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
    for name, raw in (
        ("F32", values.view(np.uint8)),
        ("F16", values.astype(np.float16).view(np.uint8)),
        ("BF16", gguf.quants.quantize(values, Q.BF16)),
    ):
        expected = gguf.quants.dequantize(raw.reshape(5, -1), Q[name]).astype(np.float32)
        ours = dequantize(torch.from_numpy(raw.reshape(-1).copy()), GGML_BY_NAME[name], (5, 6), torch.float32)
        assert torch.equal(ours, torch.from_numpy(expected)), name


@pytest.mark.parametrize(
    ("encode", "qtype", "bound"),
    [(quantize_q4_k, Q.Q4_K, 0.1), (quantize_q5_k, Q.Q5_K, 0.05), (quantize_q6_k, Q.Q6_K, 0.03)],
)
def test_test_k_quant_encoders_decode_with_gguf_py(encode, qtype, bound) -> None:
    """The test helpers' Q4_K / Q6_K encoders write blocks gguf-py decodes to the input within 4-/6-bit error."""
    x = (np.random.default_rng(3).normal(size=8 * 256) * 0.05).astype(np.float32)
    x[:256] = 0.0  # an all-zero super-block stays zero
    decoded = gguf.quants.dequantize(encode(x), qtype).reshape(-1)
    assert np.all(decoded[:256] == 0)
    rel = np.linalg.norm(decoded - x) / np.linalg.norm(x)
    print(f"{qtype.name} test encoder: rel. L2 {rel:.4f}")
    assert 0 < rel <= bound


def test_reader_reads_what_gguf_py_writes(tmp_path: Path) -> None:
    """Key-values of every type (arrays included), a non-default alignment and tensor bytes, as gguf-py wrote them."""
    path = tmp_path / "kv.gguf"
    writer = gguf.GGUFWriter(str(path), "wan")
    writer.add_custom_alignment(64)
    writer.add_uint8("t.u8", 200)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float32("t.f32", 0.5)
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "Wan2.2 ✓")
    writer.add_array("t.ints", [3, 1, 4])
    writer.add_array("t.strs", ["a", "bc"])
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    q8 = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), Q.Q8_0)
    writer.add_tensor("dense", values)
    writer.add_tensor("q8", q8, raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    gf = read_gguf(path)
    kv = gf.kv
    assert gf.version == 3 and gf.architecture == "wan" and kv["general.alignment"] == 64
    assert (kv["t.u8"], kv["t.i16"], kv["t.u32"], kv["t.i64"]) == (200, -300, 4_000_000_000, -(2**40))
    assert (kv["t.f32"], kv["t.f64"], kv["t.bool"], kv["t.str"]) == (0.5, 1e-300, True, "Wan2.2 ✓")
    assert kv["t.ints"] == [3, 1, 4] and kv["t.strs"] == ["a", "bc"]
    theirs = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert gf.data_offset % 64 == 0
    for name, shape in (("dense", (2, 3, 4)), ("q8", (2, 32))):
        info = gf.tensors[name]
        assert info.shape == shape and info.offset == int(theirs[name].data_offset)
        assert np.array_equal(gf.raw(name).numpy(), np.asarray(theirs[name].data).reshape(-1).view(np.uint8))
    assert gf.tensors["q8"].ggml_type.name == "Q8_0" and gf.tensors["q8"].nbytes == 68


def test_damaged_files_raise_one_clear_line(tmp_path: Path, tiny: Path) -> None:
    good = tmp_path / "good.gguf"
    write_gguf_dit(good, tiny / "t2v-A14B" / "low_noise_model", "Q8_0")
    data = good.read_bytes()
    cases = {
        "empty.gguf": b"",
        "magic.gguf": b"GGML" + data[4:],
        "header.gguf": data[:200],  # cut inside the key-values
        "data.gguf": data[:-100],  # the last tensor runs past the end
        "version.gguf": data[:4] + (7).to_bytes(4, "little") + data[8:],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            read_gguf(tmp_path / name)
        message = str(err.value)
        print(message)
        assert name in message and "\n" not in message


def test_gguf_dit_table_config_and_shapes(tiny: Path, tmp_path: Path) -> None:
    """A Q4_K_M file (ComfyUI prefix, reshaped K-quant rows): official names, original shapes, types as §3.4
    describes, and the config from the `config` key; without it the config comes from the shapes."""
    official = tiny / "i2v-A14B" / "high_noise_model"
    path = tmp_path / "Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf"
    write_gguf_dit(path, official, "Q4_K_M", prefix="model.diffusion_model.")
    source = official_dit_sd(official)
    table = dit_tensor_table(path)
    assert set(table) == set(source)
    assert all(table[k].shape == tuple(v.shape) for k, v in source.items())
    kinds = {t.dtype for t in table.values()}
    assert kinds == {"Q4_K", "Q6_K", "F32", "BF16"}  # the i2v fixture is stored bf16
    assert table["blocks.1.cross_attn.v.weight"].dtype == "Q6_K" and table["blocks.0.ffn.0.weight"].dtype == "Q4_K"
    assert table["patch_embedding.weight"].dtype == "F32" and len(table["patch_embedding.weight"].shape) == 5
    config = json.loads((official / "config.json").read_text())
    assert read_dit_config(path) == dit_config_from_official(config, source)

    # Without the key the heads are dim / 128, as for real files: 0 for the tiny dim 64, said in one line.
    bare = tmp_path / "no-config-Q8_0.gguf"
    write_gguf_dit(bare, official, "Q8_0", config=False)
    with pytest.raises(CheckpointError, match="num_heads=0"):
        checked_dit_config(bare, get_task("i2v-A14B"))


def test_real_a14b_q4_k_m_expert_is_counted_as_stored(tmp_path: Path) -> None:
    """A header with a real I2V-A14B Q4_K_M expert's 1095 tensors (data section a sparse hole): the planner counts
    its weights as stored (~9.65 GB), not as bf16 (28.6 GB); the header alone is read."""
    tensors = a14b_i2v_q4_k_m_tensors()
    assert len(tensors) == 1095
    assert sum(q == Q.Q4_K for _, q in tensors.values()) == 280 and sum(q == Q.Q6_K for _, q in tensors.values()) == 120
    path = tmp_path / "Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf"
    size = write_gguf_header_only(path, tensors, "Q4_K_M")
    print(f"I2V-A14B Q4_K_M expert written with these shapes: {size:,} bytes (QuantStack's: 9,651,728,896)")
    assert size == 9_651_728_896

    cfg = checked_dit_config(path, get_task("i2v-A14B"))  # no config key: inferred from the shapes
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.in_dim, cfg.out_dim) == (
        5120,
        13824,
        40,
        40,
        36,
        16,
    )
    table = dit_tensor_table(path)
    model = model_bytes_from_tensors(table, dense_bytes=2)
    print(f"predicted weights {model.total_bytes:,} bytes, largest block {model.largest_block_bytes:,}")
    assert model.quant == "as stored" and model.num_blocks == 40
    # Everything is counted as stored but the 5-D F32 patch embedding, held in bf16 (1.5 MB less), and the header.
    assert size - 2 * 2**20 < model.total_bytes < size
    bf16 = model_bytes_from_tensors({k: type(v)(v.shape, "BF16") for k, v in table.items()}, dense_bytes=2)
    assert model.total_bytes < 0.35 * bf16.total_bytes
    # One Linear dequantized at a time: the largest (ffn, 5120 x 13824) in bf16, plus bounded temporaries.
    assert 5120 * 13824 * 2 < model.dequant_scratch_bytes <= 5120 * 13824 * 2 + 256 * 2**20


# One forward of the golden dit_t2v case (t2v-A14B high-noise expert) with GGUF weights, float32 compute.
# Bounds: about twice the measured rel. L2 to the official output (Q8_0 2.5e-3, Q4_K_M 2.7e-2 with the test
# encoders; fp8 per-layer scales give 1.2e-2, tests/test_formats.py).
QUANT_GOLDEN_TOL = {"Q8_0": 5e-3, "Q4_K_M": 6e-2}


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
def test_gguf_dit_forward_against_golden(ftype: str, tiny: Path, tmp_path: Path, golden) -> None:
    """The packed DiT computes what nn.Linear computes with the offline-dequantized weights (gguf-py's values) and
    differs from the official output only by the quantization; bf16 compute dequantizes straight to bf16."""
    from wan_local.memory.quant.gguf import GGUFLinear, load_gguf_dit
    from wan_local.models.dit import WanDiT

    path = tmp_path / f"Wan2.2-T2V-A14B-HighNoise-{ftype}.gguf"
    stored = write_gguf_dit(path, tiny / "t2v-A14B" / "high_noise_model", ftype)
    model = load_gguf_dit(path, torch.float32, expected_model_type="t2v")
    assert sum(isinstance(m, GGUFLinear) for m in model.modules()) == 2 * 10
    reference = WanDiT(model.cfg)
    reference.load_state_dict(stored)
    g = golden("dit_t2v")
    with torch.inference_mode():
        out = model(g["x"][None], g["t"], [g["context"]])[0]
        expected = reference.eval()(g["x"][None], g["t"], [g["context"]])[0]
        with torch.autocast("cpu", torch.bfloat16):
            layer = model.blocks[0].ffn[0]
            x = torch.randn(5, layer.in_features)
            w = stored["blocks.0.ffn.0.weight"].bfloat16()
            assert torch.equal(layer(x), torch.nn.functional.linear(x.bfloat16(), w, layer.bias.bfloat16()))
    assert rel_l2(out, expected) <= 1e-6
    err = rel_l2(out, g["out"])
    print(f"{ftype}: dit_t2v rel. L2 to the official output {err:.2e}")
    assert 0 < err <= QUANT_GOLDEN_TOL[ftype]


def test_gguf_umt5_encoder_loads_and_is_found(tiny: Path, tmp_path: Path, golden, cases) -> None:
    """A `t5encoder` GGUF (llama.cpp names, Q8_0) is found as the text encoder of a ComfyUI folder and encodes as
    the same weights dequantized offline do; its error to the official encoder is the Q8_0 rounding."""
    from comfy_files import agreeing_proto, write_comfy_vae
    from gguf_files import write_gguf_umt5
    from safetensors.torch import save_file

    from wan_local.weights.gguf.umt5 import transformers_name
    from wan_local.weights.layout import find_checkpoints
    from wan_local.weights.loading import load_text_encoder
    from wan_local.weights.tokenizer_source import tokenizer_source

    root = tmp_path / "models"
    path = root / "text_encoders" / "umt5-xxl-encoder-Q8_0.gguf"
    path.parent.mkdir(parents=True)
    # The tokenizer travels as llama.cpp key-values, made from a proto that agrees with the fixture's tokenizer.json
    # (as the real umt5-xxl spiece.model agrees with its tokenizer.json): no tokenizer folder in this folder.
    proto = tmp_path / "spiece.model"
    proto.write_bytes(agreeing_proto(tiny))
    stored = write_gguf_umt5(path, tiny / "t2v-A14B" / "models_t5_umt5-xxl-enc-bf16.pth", spiece_model=proto)
    offline = tmp_path / "umt5_offline.safetensors"
    save_file({transformers_name(k): v for k, v in stored.items()}, str(offline))
    (root / "diffusion_models").mkdir()
    write_gguf_dit(root / "diffusion_models" / "Wan2.2-TI2V-5B-Q8_0.gguf", tiny / "ti2v-5B", "Q8_0")
    write_comfy_vae(root / "vae" / "wan2.2_vae.safetensors", tiny / "ti2v-5B" / "Wan2.2_VAE.pth")
    found = find_checkpoints(root, get_task("ti2v-5B"))
    assert found.text_encoder == path and found.tokenizer is None

    g = golden("t2v_a14b_unipc")
    tokenizer = tokenizer_source(found.tokenizer, found.text_encoder).load()
    ids, mask = tokenizer([cases["t2v_a14b_unipc"]["args"]["prompt"]], 512)
    assert torch.equal(ids[0], g["prompt_ids"]) and torch.equal(mask[0], g["prompt_mask"])
    contexts = []
    for source in (path, offline):
        encoder = load_text_encoder(source, dtype=torch.float32)
        with torch.inference_mode():
            contexts.append(encoder.encode(ids, mask)[0])
    assert rel_l2(contexts[0], contexts[1]) <= 1e-6
    err = rel_l2(contexts[0], g["context_prompt"])
    print(f"Q8_0 UMT5: context rel. L2 to the official encoder {err:.2e}")
    assert 0 < err <= 2e-2


def test_gguf_t5_tokenizer_rebuilds_the_sentencepiece_model(tiny: Path, tmp_path: Path) -> None:
    """The tokenizer llama.cpp's converter stores as key-values comes back as a sentencepiece model that tokenizes
    exactly as the `spiece.model` it was made from (the normalizer's dummy prefix included)."""
    import sentencepiece
    from gguf_files import write_gguf_umt5

    from wan_local.weights.gguf.tokenizer import (
        gguf_carries_tokenizer,
        read_gguf_tokenizer,
        sentencepiece_model_from_gguf,
    )

    spiece = tiny / "t2v-A14B" / "google" / "umt5-xxl" / "spiece.model"
    path = tmp_path / "umt5-xxl-encoder-Q8_0.gguf"
    write_gguf_umt5(path, tiny / "t2v-A14B" / "models_t5_umt5-xxl-enc-bf16.pth", spiece_model=spiece)
    original = sentencepiece.SentencePieceProcessor(model_file=str(spiece))
    rebuilt = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model_from_gguf(read_gguf(path)))
    texts = [
        "A red fox runs through fresh snow at sunrise, cinematic lighting.",
        "Two small boats drift on a calm blue lake. 湖面上的小船。",
        "  extra   spaces\tand <unk> </s> tokens ",
    ]
    assert rebuilt.get_piece_size() == original.get_piece_size()
    assert (rebuilt.unk_id(), rebuilt.eos_id(), rebuilt.pad_id(), rebuilt.bos_id()) == (
        original.unk_id(),
        original.eos_id(),
        original.pad_id(),
        original.bos_id(),
    )
    assert [rebuilt.encode(t) for t in texts] == [original.encode(t) for t in texts]
    # the normalizer flags matter: without the dummy prefix the first word tokenizes differently
    gf = read_gguf(path)
    gf.kv["tokenizer.ggml.add_space_prefix"] = False
    plain = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model_from_gguf(gf))
    assert plain.encode(texts[0]) != original.encode(texts[0])

    dit = tmp_path / "Wan2.2-TI2V-5B-Q8_0.gguf"
    write_gguf_dit(dit, tiny / "ti2v-5B", "Q8_0")
    with pytest.raises(CheckpointError, match="carries no T5 tokenizer"):
        sentencepiece_model_from_gguf(read_gguf(dit))
    assert gguf_carries_tokenizer(path) and not gguf_carries_tokenizer(dit)
    assert (
        read_gguf_tokenizer(path) == sentencepiece_model_from_gguf(read_gguf(path)) and read_gguf_tokenizer(dit) is None
    )
