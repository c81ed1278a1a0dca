"""ComfyUI text encoders as Comfy-Org ships them: bare HF-T5 names, the tokenizer inside (`spiece_model`), fp16 or
fp8_e4m3fn_scaled (both scale spellings, `.comfy_quant` blobs), and no tokenizer folder (spec §3.3).

Ids are checked against the golden ids of the official code and against the `tokenizers` library running the
fixture's tokenizer.json (the independent reference for special-token strings typed in a prompt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from comfy_files import (
    FP8_DIT_LINEAR,
    FP8_UMT5_LINEAR,
    TOKENIZER_DIR,
    agreeing_proto,
    set_add_dummy_prefix,
    write_comfy_dit,
    write_comfy_folder,
    write_comfy_text_encoder,
)
from conftest import rel_l2
from safetensors.torch import load_file, save_file

from wan_local.errors import CheckpointError
from wan_local.memory.quant.formats import load_quantized_dit, scaled_fp8_state_dict
from wan_local.prompt import PromptTokenizer, clean_prompt, proto_normalizer_flags
from wan_local.specs import get_task
from wan_local.weights.keymaps import strip_prefix
from wan_local.weights.layout import find_checkpoints
from wan_local.weights.loading import load_dit, load_text_encoder
from wan_local.weights.tokenizer_source import TokenizerSource, tokenizer_source

PIPELINE_CASES = ["t2v_a14b_unipc", "t2v_a14b_dpmpp", "i2v_a14b_unipc", "ti2v_5b_t2v", "ti2v_5b_i2v"]
#: Special-token strings inside prompts, spaces around them or not, in several places.
SPECIAL_TEXTS = [
    "a </s> b",
    "a</s>b",
    "</s> starts",
    "ends </s>",
    "x </s> </s> y",
    "<unk> and <pad> and </s>",
    "fox<unk>snow <pad>",
    "湖面</s>上的 <unk>小船。",
]
TE_STEM = "umt5_xxl"


@pytest.fixture(scope="module")
def comfy_te(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("te") / "umt5_xxl_fp16.safetensors"
    write_comfy_text_encoder(path, tiny, "fp16")
    return path


def _reference(tokenizer_json: Path, texts: list[str]) -> list[list[int]]:
    """The fast tokenizer's ids (EOS appended by its post-processor) of the cleaned texts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    return [tok.encode(clean_prompt(t)).ids for t in texts]


def _ours(tok: PromptTokenizer, texts: list[str]) -> list[list[int]]:
    ids, mask = tok(texts, max_length=128)
    return [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]


def _rewrite(path: Path, change) -> None:
    """Apply `change(dict)` to the tensors of a safetensors file, in place (metadata kept)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    change(sd)
    save_file(sd, str(path), meta)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_the_file_is_keyed_as_comfy_org_ships_it(comfy_te: Path, tiny: Path) -> None:
    sd = load_file(str(comfy_te))
    spiece = sd.pop("spiece_model")
    assert spiece.dtype == torch.uint8 and spiece.dim() == 1
    assert all(k.startswith(("shared.", "encoder.")) for k in sd)  # bare HF-T5 names, no prefix
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in sd  # one per block
    assert {v.dtype for v in sd.values()} == {torch.float16}
    # The embedded proto is the fixture's, with the dummy prefix as its tokenizer.json says (prepend "never").
    assert proto_normalizer_flags(bytes(spiece.numpy())) == {
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": True,
    }
    original = (tiny / "t2v-A14B" / TOKENIZER_DIR / "spiece.model").read_bytes()
    assert proto_normalizer_flags(original)["add_dummy_prefix"] is True


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_embedded_tokenizer_gives_golden_ids(name: str, comfy_te: Path, cases: dict, golden) -> None:
    tok = TokenizerSource(None, comfy_te).load()
    case, g = cases[name], golden(name)
    ids, mask = tok([case["args"]["prompt"], case["args"]["n_prompt_effective"]])
    assert torch.equal(ids[0], g["prompt_ids"]) and torch.equal(mask[0], g["prompt_mask"])
    assert torch.equal(ids[1], g["neg_ids"]) and torch.equal(mask[1], g["neg_mask"])


def test_special_token_strings_as_the_fast_tokenizer(comfy_te: Path, tiny: Path, tmp_path: Path) -> None:
    """`</s>`, `<pad>`, `<unk>` typed in a prompt: the ids of the tokenizers library on the same tokenizer, for the
    fixture's settings (no dummy prefix, Metaspace "never") and the real umt5-xxl's (dummy prefix, "always")."""
    folder = tiny / "t2v-A14B" / TOKENIZER_DIR
    embedded = TokenizerSource(None, comfy_te).load()
    assert _ours(embedded, SPECIAL_TEXTS) == _reference(folder / "tokenizer.json", SPECIAL_TEXTS)

    data = json.loads((folder / "tokenizer.json").read_text())
    for part in ("pre_tokenizer", "decoder"):
        data[part]["prepend_scheme"] = "always"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    proto = set_add_dummy_prefix((folder / "spiece.model").read_bytes(), True)
    always = PromptTokenizer.from_sentencepiece(proto, "add_dummy_prefix=true")
    expected = _reference(tmp_path / "tokenizer.json", SPECIAL_TEXTS)
    assert _ours(always, SPECIAL_TEXTS) == expected
    assert expected != _reference(folder / "tokenizer.json", SPECIAL_TEXTS)  # the two settings differ here


def test_truncation_keeps_eos_and_pads(comfy_te: Path) -> None:
    tok = TokenizerSource(None, comfy_te).load()
    ids, mask = tok(["A red fox runs through fresh snow. " * 40, "short"], max_length=32)
    assert int(mask[0].sum()) == 32 and ids[0, 31] == 1
    n = int(mask[1].sum())
    assert ids[1, n - 1] == 1 and (ids[1, n:] == 0).all()


def test_broken_embedded_tokenizer_is_named(comfy_te: Path, tmp_path: Path) -> None:
    path = tmp_path / comfy_te.name
    shutil.copy(comfy_te, path)
    _rewrite(path, lambda sd: sd.update(spiece_model=torch.full((64,), 0xFF, dtype=torch.uint8)))
    with pytest.raises(CheckpointError, match=r"umt5_xxl_fp16\.safetensors.*sentencepiece"):
        TokenizerSource(None, path).load()
    _rewrite(path, lambda sd: sd.update(spiece_model=torch.zeros(4)))
    with pytest.raises(CheckpointError, match="1-D uint8"):
        TokenizerSource(None, path).load()


# ---------------------------------------------------------------------------------- folder next to the file


def test_folder_and_agreeing_embedded_tokenizer(comfy_te: Path, tiny: Path, tmp_path: Path, caplog) -> None:
    folder = tmp_path / TOKENIZER_DIR
    shutil.copytree(tiny / "t2v-A14B" / TOKENIZER_DIR, folder)
    with caplog.at_level(logging.WARNING):
        tok = tokenizer_source(folder, comfy_te).load()
    assert tok.source == str(folder / "tokenizer.json")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_folder_and_disagreeing_embedded_tokenizer(comfy_te: Path, tiny: Path, tmp_path: Path, caplog, golden) -> None:
    """The file carries the fixture's spiece.model as it is (dummy prefix on): one warning naming both, and the
    folder's ids (the golden ones) are used."""
    folder = tiny / "t2v-A14B" / TOKENIZER_DIR
    path = tmp_path / comfy_te.name
    shutil.copy(comfy_te, path)
    raw = (folder / "spiece.model").read_bytes()
    _rewrite(path, lambda sd: sd.update(spiece_model=torch.frombuffer(bytearray(raw), dtype=torch.uint8)))
    with caplog.at_level(logging.WARNING):
        tok = tokenizer_source(folder, path).load()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert str(path) in warnings[0] and str(folder / "tokenizer.json") in warnings[0] and "disagrees" in warnings[0]
    g = golden("t2v_a14b_unipc")
    ids, _ = tok(["A red fox runs through fresh snow at sunrise, cinematic lighting."])
    assert torch.equal(ids[0], g["prompt_ids"])


def test_tokenizer_identity_is_the_content(comfy_te: Path, tiny: Path, tmp_path: Path) -> None:
    """The embedded tokenizer is identified by its proto bytes, a folder by its files' contents."""
    source = TokenizerSource(None, comfy_te)
    proto = agreeing_proto(tiny)
    assert source.identity() == hashlib.sha256(b"sentencepiece-proto\0" + proto).hexdigest()
    other = tmp_path / comfy_te.name
    shutil.copy(comfy_te, other)
    assert TokenizerSource(None, other).identity() == source.identity()  # another path, the same tokenizer
    raw = (tiny / "t2v-A14B" / TOKENIZER_DIR / "spiece.model").read_bytes()
    _rewrite(other, lambda sd: sd.update(spiece_model=torch.frombuffer(bytearray(raw), dtype=torch.uint8)))
    assert TokenizerSource(None, other).identity() != source.identity()
    folder = TokenizerSource(tiny / "t2v-A14B" / TOKENIZER_DIR, comfy_te)
    assert folder.identity() not in (source.identity(), TokenizerSource(None, other).identity())


# ------------------------------------------------------------------------------------------------------ layout


def test_layout_needs_no_tokenizer_folder(tiny: Path, tmp_path: Path) -> None:
    root = write_comfy_folder(tmp_path / "models", tiny, "ti2v-5B")
    found = find_checkpoints(root, get_task("ti2v-5B"))
    assert found.format == "comfyui" and found.tokenizer is None
    assert found.text_encoder == root / "text_encoders" / "umt5_xxl_fp16.safetensors"
    assert tokenizer_source(found.tokenizer, found.text_encoder).describe().endswith("(spiece_model)")

    shutil.copytree(tiny / "ti2v-5B" / TOKENIZER_DIR, root / TOKENIZER_DIR)
    assert find_checkpoints(root, get_task("ti2v-5B")).tokenizer == root / TOKENIZER_DIR


def test_layout_without_any_tokenizer_says_so(tiny: Path, tmp_path: Path) -> None:
    root = write_comfy_folder(tmp_path / "models", tiny, "ti2v-5B")
    _rewrite(root / "text_encoders" / "umt5_xxl_fp16.safetensors", lambda sd: sd.pop("spiece_model"))
    with pytest.raises(CheckpointError) as info:
        find_checkpoints(root, get_task("ti2v-5B"))
    message = str(info.value)
    assert "umt5_xxl_fp16.safetensors carries none (no spiece_model" in message and "google/umt5-xxl/" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------- fp8 and both spellings


def _newer_comfy_spelling(sd: dict[str, torch.Tensor], fmt: str = "float8_e4m3fn") -> None:
    """What newer ComfyUI writes back (its convert_old_quants): `.weight_scale` instead of `.scale_weight`, one
    `.comfy_quant` JSON blob per quantised layer, no `scaled_fp8` marker."""
    for key in [k for k in sd if k.endswith(".scale_weight")]:
        layer = key.removesuffix(".scale_weight")
        sd[layer + ".weight_scale"] = sd.pop(key)
        blob = json.dumps({"format": fmt}).encode()
        sd[layer + ".comfy_quant"] = torch.tensor(list(blob), dtype=torch.uint8)
    for key in [k for k in sd if k.endswith("scaled_fp8")]:
        del sd[key]


def test_fp8_text_encoder_both_spellings(tiny: Path, tmp_path: Path, golden) -> None:
    legacy = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    effective = write_comfy_text_encoder(legacy, tiny, "fp8_scaled")
    stored = load_file(str(legacy))
    assert sum(k.endswith(".scale_weight") for k in stored) == 7 * 2  # 7 Linears x 2 layers, embedding not
    assert stored["shared.weight"].dtype == torch.float16 and "scaled_fp8" in stored
    newer = tmp_path / "newer" / legacy.name
    newer.parent.mkdir()
    shutil.copy(legacy, newer)
    _rewrite(newer, _newer_comfy_spelling)
    for path in (legacy, newer):
        sd = load_text_encoder(path, dtype=torch.float32).umt5.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in effective.items()), path
        assert sum(bool(FP8_UMT5_LINEAR.fullmatch(k)) for k in effective) == 14
    g = golden("t2v_a14b_unipc")
    encoder = load_text_encoder(newer, dtype=torch.float32)
    err = rel_l2(encoder.encode(g["prompt_ids"][None], g["prompt_mask"][None])[0], g["context_prompt"])
    assert 0 < err <= 0.15  # e4m3 rounding of every Linear; measured 0.08-0.11 (test_text_encoder)


def test_fp16_text_encoder_loads_exactly(comfy_te: Path, tiny: Path, golden) -> None:
    sd = load_text_encoder(comfy_te, dtype=torch.float32).umt5.state_dict()
    official = torch.load(tiny / "t2v-A14B" / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    assert torch.equal(sd["shared.weight"], official["token_embedding.weight"].float())  # bf16 -> fp16 exact
    g = golden("t2v_a14b_unipc")
    encoder = load_text_encoder(comfy_te, dtype=torch.float32)
    out = encoder.encode(g["prompt_ids"][None], g["prompt_mask"][None])[0]
    assert rel_l2(out, g["context_prompt"]) <= 1e-5


def test_fp8_dit_both_spellings(tiny: Path, tmp_path: Path, golden) -> None:
    """A DiT in legacy fp8_scaled and in newer ComfyUI's spelling (prefixed `.weight_scale` + `.comfy_quant`) loads
    to the same weights, dequantised (load_dit) or kept in fp8 (the quantized-DiT reader)."""
    legacy = tmp_path / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    effective = write_comfy_dit(legacy, tiny / "t2v-A14B" / "high_noise_model", "fp8_scaled")
    assert "model.diffusion_model.scaled_fp8" in load_file(str(legacy))
    newer = tmp_path / "newer" / legacy.name
    newer.parent.mkdir()
    shutil.copy(legacy, newer)
    _rewrite(newer, _newer_comfy_spelling)
    assert any(k.startswith("model.diffusion_model.") and k.endswith(".comfy_quant") for k in load_file(str(newer)))
    g = golden("dit_t2v")
    for path in (legacy, newer):
        model = load_dit(path, expected_model_type="t2v")
        loaded = model.state_dict()
        assert loaded.keys() == effective.keys()
        assert all(torch.equal(loaded[k], effective[k]) for k in effective), path

        kept = scaled_fp8_state_dict(strip_prefix(load_file(str(path))), str(path))
        for key in (k for k in effective if FP8_DIT_LINEAR.fullmatch(k)):
            layer = key.removesuffix(".weight")
            assert kept[key].dtype == torch.float8_e4m3fn and kept[layer + ".scale"].dim() == 0
            assert torch.equal(kept[key].float() * kept[layer + ".scale"], effective[key])
        # The quantized-DiT loader keeps the fp8 weights and computes the same forward.
        quantized = load_quantized_dit(path, "fp8", dtype=torch.float32, expected_model_type="t2v")
        with torch.inference_mode():
            a = model(g["x"][None], g["t"], [g["context"]])
            b = quantized(g["x"][None], g["t"], [g["context"]])
        assert rel_l2(b, a) <= 1e-6, path


def test_unsupported_comfy_quant_format_is_named(tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    write_comfy_text_encoder(path, tiny, "fp8_scaled")
    _rewrite(path, lambda sd: _newer_comfy_spelling(sd, "nvfp4"))
    with pytest.raises(CheckpointError, match=r"comfy_quant says the layer is stored as 'nvfp4'.*fp16 or fp8_scaled"):
        load_text_encoder(path, dtype=torch.float32)


def test_resolver_counts_weights_only(tiny: Path, tmp_path: Path) -> None:
    """The job resolver sizes UMT5 from its weights: not the tokenizer bytes, scales or `.comfy_quant` blobs."""
    from wan_local.engine.resolve import read_checkpoint

    root = write_comfy_folder(tmp_path / "models", tiny, "ti2v-5B", te="fp8_scaled")
    path = root / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    _rewrite(path, _newer_comfy_spelling)
    weights = load_file(str(path))
    info = read_checkpoint(root, get_task("ti2v-5B"))
    expected = sum(v.numel() for k, v in weights.items() if k.endswith(".weight"))
    assert info.text_encoder_params == expected
    assert len(weights["spiece_model"]) > 0 and any(k.endswith(".comfy_quant") for k in weights)
    assert info.text_encoder_embedding_params == weights["shared.weight"].numel()
