"""Where the UMT5 tokenizer of a checkpoint comes from, and its identity.

- a tokenizer folder (``google/umt5-xxl/``, diffusers' ``tokenizer/``): ``tokenizer.json`` as the reference runs
  it, else ``spiece.model``;
- the text-encoder file itself: Comfy-Org's ``umt5_xxl_*.safetensors`` carry the serialized sentencepiece
  ModelProto as a 1-D uint8 tensor ``spiece_model`` (spec §3.3; a ComfyUI install has no tokenizer folder).

Each text-encoder file type says how it carries a tokenizer through one entry of ``EMBEDDED_TOKENIZERS``
(suffix -> ``EmbeddedTokenizer``: a header check and a reader of the ModelProto bytes). A GGUF text encoder
(llama.cpp ``tokenizer.ggml.*`` key-values, spec §3.4) plugs in as one more entry whose reader rebuilds the proto;
everything downstream (identity, comparison with a folder, tokenizing) works on the proto bytes.

When a folder and an embedded tokenizer are both there, the folder is used (it is what the official code runs)
and the two are compared on probe texts; a disagreement is logged as one warning naming both.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wan_local.errors import CheckpointError

if TYPE_CHECKING:
    from wan_local.prompt import PromptTokenizer

log = logging.getLogger(__name__)

#: The key under which ComfyUI stores the tokenizer in a text-encoder state dict (bare, or under a bundle prefix).
SPIECE_KEY = "spiece_model"


def _spiece_key(keys: list[str]) -> str | None:
    if SPIECE_KEY in keys:
        return SPIECE_KEY
    found = sorted(k for k in keys if k.endswith("." + SPIECE_KEY))
    return found[0] if found else None


def safetensors_spiece_key(path: Path) -> str | None:
    """The name of the ``spiece_model`` tensor in a safetensors file's header, or None (no tensor data read)."""
    from wan_local.weights.files import safetensors_keys

    return _spiece_key(safetensors_keys(path))


def read_safetensors_spiece(path: Path) -> bytes | None:
    """The sentencepiece ModelProto a safetensors text encoder carries as ``spiece_model``, or None."""
    from safetensors import SafetensorError, safe_open

    key = safetensors_spiece_key(path)
    if key is None:
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {key} from {path} ({exc}); download the file again") from exc
    if tensor.dim() != 1 or tensor.element_size() != 1 or tensor.is_floating_point():
        raise CheckpointError(
            f"{path}: {key} is {tensor.dtype} {tuple(tensor.shape)}, not the 1-D uint8 bytes of a sentencepiece "
            "model; download the file again"
        )
    return tensor.contiguous().numpy().tobytes()


def _gguf_carries(path: Path) -> bool:
    from wan_local.weights.gguf.tokenizer import gguf_carries_tokenizer

    return gguf_carries_tokenizer(path)


def _gguf_read(path: Path) -> bytes | None:
    from wan_local.weights.gguf.tokenizer import read_gguf_tokenizer

    return read_gguf_tokenizer(path)


@dataclass(frozen=True)
class EmbeddedTokenizer:
    """How one type of text-encoder file carries its tokenizer.

    what: how messages name it (e.g. "spiece_model"). carries: whether a file holds one, from its header only.
    read: the sentencepiece ModelProto bytes it holds (None when it holds none).
    """

    what: str
    carries: Callable[[Path], bool]
    read: Callable[[Path], bytes | None]


#: file suffix -> how that type of text-encoder file carries its tokenizer.
EMBEDDED_TOKENIZERS: dict[str, EmbeddedTokenizer] = {
    ".safetensors": EmbeddedTokenizer(
        SPIECE_KEY, lambda path: safetensors_spiece_key(path) is not None, read_safetensors_spiece
    ),
    ".gguf": EmbeddedTokenizer("tokenizer.ggml.*", _gguf_carries, _gguf_read),
}


def carries_tokenizer(text_encoder: Path) -> bool:
    """Whether the text-encoder file holds its own tokenizer (ComfyUI ``spiece_model`` …)."""
    path = Path(text_encoder)
    kind = EMBEDDED_TOKENIZERS.get(path.suffix)
    return kind is not None and path.is_file() and kind.carries(path)


def _folder_identity(folder: Path) -> str:
    """sha256 over the names and contents of the folder's tokenizer files."""
    from wan_local.prompt import TOKENIZER_FILES

    digest = hashlib.sha256(b"tokenizer-folder\0")
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")  # a few MB at most
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenizerSource:
    """The tokenizer of one checkpoint: a folder, a text-encoder file carrying one, or both (folder used).

    folder: the tokenizer folder, None when there is none. embedded: the text-encoder file that carries a
    tokenizer, None when it carries none.
    """

    folder: Path | None
    embedded: Path | None

    def __post_init__(self) -> None:
        if self.folder is None and self.embedded is None:
            raise CheckpointError("no tokenizer: neither a tokenizer folder nor a text encoder that carries one")

    def describe(self) -> str:
        """The folder, else the file and what in it holds the tokenizer."""
        return str(self.folder) if self.folder is not None else self._embedded_name()

    def _embedded_name(self) -> str:
        assert self.embedded is not None
        return f"{self.embedded} ({EMBEDDED_TOKENIZERS[self.embedded.suffix].what})"

    def _proto(self) -> bytes:
        return self._proto_bytes

    @functools.cached_property
    def _proto_bytes(self) -> bytes:
        """Read once per source: `identity` and then, on a prompt-cache miss, `load` both need it (rebuilding a
        GGUF file's 256,384-piece proto takes about a second)."""
        assert self.embedded is not None
        proto = EMBEDDED_TOKENIZERS[self.embedded.suffix].read(self.embedded)
        if proto is None:
            raise CheckpointError(f"{self._embedded_name()}: the file carries no tokenizer")
        return proto

    def identity(self) -> str:
        """sha256 hex of what decides the ids: the folder's tokenizer files, else the embedded proto bytes."""
        if self.folder is not None:
            return _folder_identity(self.folder)
        return hashlib.sha256(b"sentencepiece-proto\0" + self._proto()).hexdigest()

    def load(self) -> PromptTokenizer:
        """The tokenizer to run; with both a folder and an embedded one, the folder, after comparing the two."""
        from wan_local.prompt import PromptTokenizer, first_disagreement

        if self.folder is None:
            return PromptTokenizer.from_sentencepiece(self._proto(), self.describe())
        tokenizer = PromptTokenizer.from_dir(self.folder)
        if self.embedded is not None:
            embedded = PromptTokenizer.from_sentencepiece(self._proto(), self._embedded_name())
            text = first_disagreement(tokenizer, embedded)
            if text is not None:
                log.warning(
                    "the tokenizer in %s disagrees with %s (first on %r); using %s, what the official code runs",
                    embedded.source, tokenizer.source, text[:40], tokenizer.source,
                )  # fmt: skip
        return tokenizer


def tokenizer_source(folder: Path | None, text_encoder: Path) -> TokenizerSource:
    """The tokenizer of a checkpoint whose tokenizer folder is `folder` (None: none) and text encoder
    `text_encoder`; CheckpointError when there is neither."""
    embedded = Path(text_encoder) if carries_tokenizer(text_encoder) else None
    if folder is None and embedded is None:
        raise CheckpointError(
            f"no tokenizer for {text_encoder}: the file carries none ({SPIECE_KEY}) and there is no tokenizer "
            "folder (google/umt5-xxl/); use Comfy-Org's umt5_xxl_fp16 / umt5_xxl_fp8_e4m3fn_scaled file, which "
            "carries it, or put the google/umt5-xxl/ folder of the official repository next to the files"
        )
    return TokenizerSource(folder, embedded)
