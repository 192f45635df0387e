"""Library entry point of a compression run: ``compress_model`` with its ``CompressConfig`` (``dsf compress``).

Example:
    >>> from compress.api import CompressConfig, compress_model          # doctest: +SKIP
    >>> report = compress_model(CompressConfig(method="dsf", density=0.5), "runs/smollm2-dsf50")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.architectures import architecture_for
from compress.assets import PACKAGED_MODEL, load_text, smollm2_dir
from compress.calibration import OffloadMode, compress_blocks
from compress.data import calibration_windows, tokenize_text
from compress.output import check_complete, prepare_output, write_output
from compress.quantize import FORMATS as _VALUE_FORMATS
from compress.quantize import QUANTIZE_VERSION, ValueQuantization
from compress.solvers import METHODS, make_config
from compress.solvers.base import check_density
from dsf_runtime.checkpoint import MANIFEST_NAME
from dsf_runtime.formats import AUTO, AUTO_LAYOUTS, LAYOUTS

__all__ = [
    "ConfigError",
    "CompressConfig",
    "check_seqlen",
    "DTYPES",
    "RunInputs",
    "compress_model",
    "read_inputs",
    "resolve_device",
    "resolve_model_dir",
    "run_info",
]

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OFFLOAD = ("auto", "always", "never")
VALUE_FORMATS = ("float", *_VALUE_FORMATS)  # CompressConfig.values
ROUNDINGS = ("gptq", "rtn")  # CompressConfig.rounding
PIPELINES = ("sequential", "dense-inputs")  # CompressConfig.pipeline


class ConfigError(ValueError):
    """An invalid ``CompressConfig`` field; ``field`` names it so the CLI can name its flag."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class CompressConfig:
    """Everything that determines a compression run (recorded in the output's manifest and report).

    Attributes:
        model: a Hugging Face model directory, or ``"smollm2-135m"`` for the packaged SmolLM2-135M-Instruct.
        method: ``dsf``, ``sparsegpt``, ``wanda`` or ``magnitude`` (see ``compress.solvers.make_config``).
        density: fraction of each layer's weights kept (DSF: both factors' non-zeros together), in (0, 1].
        solver_options: method options passed to ``make_config`` (e.g. ``iters``, ``finalize``, ``prune_n``).
        calibration: packaged text name (``emma``, ...) or a UTF-8 file; cut into random windows.
        samples: calibration windows.
        seqlen: tokens per calibration window.
        seed: seed of the window offsets.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available).
        dtype: the model's dtype while compressing: ``float32``, ``bfloat16`` or ``float16``.
        batch_size: calibration windows per forward chunk.
        offload: where activations live: ``auto`` (CPU only when they do not fit the accelerator), ``always``
            (CPU), ``never`` (the compute device).
        true_sequential: compress the groups of a block one after another (see ``compress.calibration``).
        pipeline: what each block is calibrated on: ``sequential`` (the reference: the outputs of the already
            compressed blocks) or ``dense-inputs`` (the dense model's activations; docs/scale-out.md has its
            measured cost).
        layout: layout of the written factors: ``auto`` (each factor in the smallest of bitmask, csr and dense,
            ``dsf_runtime.formats.smallest``) or a key of ``dsf_runtime.formats.LAYOUTS``.
        save_dtype: dtype of the written factor values and floating tensors: ``auto`` (the base model's own dtype
            when it is float16 or bfloat16, else float16) or a key of ``DTYPES``. The solvers work in fp32 whatever
            this is; the recorded layer errors are those of the fp32 factors.
        embedding: ``int8`` writes the input embedding (and the output layer tied to it) as int8 with one scale
            per row (``dsf_runtime.quantized``); ``keep`` writes it in ``save_dtype``.
        values: ``float`` stores factor values in ``save_dtype``; ``int8`` or ``fp8`` (one scale per row) or
            ``int4`` (one scale per ``group_size`` columns of a row) quantizes every solved layer's values
            (``compress.quantize.ValueQuantization``) and stores the codes (docs/format.md "Quantized values").
            Later blocks calibrate on the quantized model. The recorded layer errors are those of the decoded values.
        value_group_size: int4 only: columns per scale, 64, 128 or 256 (None = 128).
        small_factor_values: DSF with quantized ``values`` only: the format (``int8``, ``fp8``, ``int4``) of each
            layer's factor with fewer kept values, e.g. ``int8`` next to ``int4`` (None = ``values``).
        rounding: how values are quantized: ``gptq`` (error feedback under the layer's H, restricted to the mask;
            DSF factors input side first) or ``rtn`` (round-to-nearest, for comparison).
    """

    model: str = PACKAGED_MODEL
    method: str = "dsf"
    density: float = 0.5
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    calibration: str = "emma"
    samples: int = 64
    seqlen: int = 512
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 8
    offload: OffloadMode = "auto"
    true_sequential: bool = False
    pipeline: str = "sequential"
    layout: str = AUTO
    save_dtype: str = "auto"
    embedding: str = "int8"
    values: str = "float"
    value_group_size: int | None = None
    rounding: str = "gptq"
    small_factor_values: str | None = None

    def __post_init__(self) -> None:
        for name in ("samples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be ≥ 1, got {getattr(self, name)}")
        if self.pipeline not in PIPELINES:
            raise ConfigError("pipeline", f"must be one of {', '.join(PIPELINES)}, got {self.pipeline!r}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.layout != AUTO and self.layout not in LAYOUTS:
            raise ConfigError("layout", f"must be {AUTO} or one of {', '.join(sorted(LAYOUTS))}, got {self.layout!r}")
        if self.save_dtype != "auto" and self.save_dtype not in DTYPES:
            raise ConfigError("save_dtype", f"must be auto or one of {', '.join(DTYPES)}, got {self.save_dtype!r}")
        if self.values not in VALUE_FORMATS:
            raise ConfigError("values", f"must be one of {', '.join(VALUE_FORMATS)}, got {self.values!r}")
        if self.small_factor_values is not None:
            if self.small_factor_values not in _VALUE_FORMATS:
                raise ConfigError("small_factor_values", f"must be one of {', '.join(_VALUE_FORMATS)}, "
                                                         f"got {self.small_factor_values!r}")
            if self.values == "float":
                raise ConfigError("small_factor_values", "applies to quantized values; add --values int8|fp8|int4")
            if self.method != "dsf":
                raise ConfigError("small_factor_values", f"applies to DSF's two factors; {self.method} stores one matrix")
        if self.value_group_size is not None and "int4" not in (self.values, self.small_factor_values):
            raise ConfigError("value_group_size", f"applies to int4 values only, not {self.values!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError("rounding", f"must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.rounding != "gptq" and self.values == "float":
            raise ConfigError("rounding", "applies to quantized values; add --values int8|fp8|int4")
        if self.values != "float" and self.layout not in (AUTO, *AUTO_LAYOUTS):
            raise ConfigError("layout", f"{self.values} codes are stored in {AUTO} or one of {', '.join(AUTO_LAYOUTS)}, "
                                        f"not {self.layout!r} (convert later: dsf export --layout)")
        try:
            self.value_quantization()
        except ValueError as exc:
            raise ConfigError("value_group_size", str(exc)) from None
        if self.embedding not in ("int8", "keep"):
            raise ConfigError("embedding", f"must be int8 or keep, got {self.embedding!r}")
        if self.offload not in _OFFLOAD:
            raise ConfigError("offload", f"must be one of {', '.join(_OFFLOAD)}, got {self.offload!r}")
        self.solver_config()  # validates method, density and the method options

    def solver_config(self) -> Any:
        """The solver config from ``compress.solvers.make_config``.

        Raises:
            ConfigError: naming ``density`` when the solvers' density check rejects it, ``method`` for an unknown
                method, else ``solver_options``.
        """
        try:
            check_density(self.density)
        except ValueError as exc:
            raise ConfigError("density", str(exc)) from exc
        try:
            return make_config(self.method, self.density, **dict(self.solver_options))
        except (ValueError, TypeError) as exc:
            raise ConfigError("method" if self.method not in METHODS else "solver_options", str(exc)) from exc

    def value_quantization(self) -> ValueQuantization | None:
        """The quantization of every solved layer's values, or None for ``values="float"``."""
        if self.values == "float":
            return None
        return ValueQuantization(self.values, self.value_group_size, error_feedback=self.rounding == "gptq",
                                 small_factor_values=self.small_factor_values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["solver_options"] = dict(sorted(dict(self.solver_options).items()))
        return data


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; rejects CUDA when there is none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{device!r}: CUDA requested but torch sees no CUDA device; use --device cpu")
    return resolved


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """The directory of ``model``: the packaged SmolLM2 for ``"smollm2-135m"``, else the path itself.

    Raises:
        FileNotFoundError: the directory does not exist or has no ``config.json``.
        CheckpointError: the directory holds compressed-model files but no manifest (an interrupted write), the
            loader's error (``compress.output.check_complete``).
    """
    if str(model) == PACKAGED_MODEL:
        return smollm2_dir()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {str(model)!r} does not exist; pass a Hugging Face model directory "
            f"or {PACKAGED_MODEL!r} (the packaged SmolLM2)"
        )
    check_complete(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {str(model)!r} has no config.json; expected a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer files)"
        )
    return path


def check_seqlen(seqlen: int, model_config: Any, model: str) -> None:
    """Refuse windows longer than the model's context.

    Args:
        seqlen: tokens per window.
        model_config: the model's transformers config (``max_position_embeddings``; no limit when absent).
        model: the model's name or directory, for the message.

    Raises:
        ConfigError: naming ``seqlen`` and the model's ``max_position_embeddings``.
    """
    limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise ConfigError(
            "seqlen", f"{seqlen} exceeds the context of model {model!r} (max_position_embeddings = {limit} in its "
            f"config.json); use a seqlen of at most {limit}"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class RunInputs:
    """What a compression run reads before it touches the weights.

    Attributes:
        source: the model directory (None when the caller passed an already loaded model).
        model_config: the model's transformers config.
        tokenizer: its tokenizer.
        text: the calibration text.
        windows: calibration token windows [samples, seqlen] int64.
    """

    source: Path | None
    model_config: Any
    tokenizer: Any
    text: str
    windows: torch.Tensor

    def fingerprint(self, config: CompressConfig, device: torch.device) -> dict[str, Any]:
        """Settings that determine the factors: the config (but ``offload``, which moves data without changing
        it, and the output's ``layout``, ``save_dtype`` and ``embedding``, applied when the finished run is written), the model's
        config, the text and the device type."""
        settings = config.to_dict()
        for output_only in ("offload", "layout", "save_dtype", "embedding"):
            del settings[output_only]
        if config.values != "float":
            settings["quantize_version"] = QUANTIZE_VERSION
        return {
            **settings,
            "device": device.type,
            "model_config_sha256": _sha256(self.model_config.to_json_string(use_diff=False).encode()),
            "calibration_sha256": _sha256(self.text.encode()),
        }

    def save_dtype(self, config: CompressConfig) -> str:
        """``config.save_dtype`` resolved: ``auto`` is the model's own dtype (``model_config.dtype``) when that is
        float16 or bfloat16, else float16."""
        if config.save_dtype != "auto":
            return config.save_dtype
        own = getattr(self.model_config, "dtype", None)
        own = str(own).removeprefix("torch.") if own is not None else None
        return own if own in ("float16", "bfloat16") else "float16"

    def load_model(self, config: CompressConfig, model: nn.Module | None) -> nn.Module:
        """``model`` itself, or the dense model loaded from ``source`` in ``config.dtype`` (eval mode)."""
        if model is not None:
            return model
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            self.source, dtype=DTYPES[config.dtype], trust_remote_code=False
        ).eval()


def read_inputs(config: CompressConfig, model: nn.Module | None, tokenizer: Any, caller: str) -> RunInputs:
    """The model directory's config and tokenizer (or those of ``model``), the calibration text and windows.

    Raises:
        FileNotFoundError: missing model directory or calibration text.
        ValueError: the model directory is already compressed, ``model`` comes without its tokenizer, the text is
            not UTF-8 or shorter than one sample (``ConfigError`` for a ``seqlen`` beyond the model's context).
    """
    from transformers import AutoConfig, AutoTokenizer

    text = load_text(config.calibration)
    source = None
    if model is None:
        source = resolve_model_dir(config.model)
        if (source / MANIFEST_NAME).exists():
            raise ValueError(
                f"model directory {config.model!r} is already compressed ({MANIFEST_NAME}); "
                "pass the dense model it was made from"
            )
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    elif tokenizer is None:
        raise ValueError(f"{caller}(model=...) also needs the model's tokenizer")
    else:
        model_config = model.config
    check_seqlen(config.seqlen, model_config, config.model)
    windows = calibration_windows(
        tokenize_text(tokenizer, text), config.samples, config.seqlen, config.seed, name=config.calibration
    )
    return RunInputs(source, model_config, tokenizer, text, windows)


def compress_model(
    config: CompressConfig,
    output: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    model: nn.Module | None = None,
    tokenizer: Any = None,
) -> dict[str, Any] | None:
    """Compress every linear layer of a decoder and write a reloadable compressed model directory.

    Args:
        config: the run's settings.
        output: the output directory; it receives the compressed model (``docs/format.md``) and
            ``compression_report.json``. While running it holds ``.dsf-partial/`` (see ``compress.output``).
        resume: continue an interrupted run in ``output`` (same settings required).
        overwrite: replace whatever dsf output ``output`` holds.
        progress: progress bar on stderr.
        model: an already loaded ``*ForCausalLM`` to compress instead of loading ``config.model`` (which is then
            only recorded), e.g. a truncated model for smoke runs; it is modified in place.
        tokenizer: its tokenizer (required with ``model``).

    Returns:
        The content of ``compression_report.json``; None on the ranks other than 0 of a torchrun launch (the
        environment has ``WORLD_SIZE`` > 1: the run is ``compress.distributed.compress_model``, same factors).

    Raises:
        FileNotFoundError: missing model directory or calibration text.
        ValueError: unsupported architecture or layer type, a text shorter than one sample, a resume with
            different settings (``ConfigError`` for an invalid config field).
        FileExistsError: ``output`` holds another output and neither ``resume`` nor ``overwrite`` applies.
    """
    from compress import distributed  # imports this module

    if distributed.launched_world() not in (None, 1):  # a rank of a torchrun launch: see compress.distributed
        return distributed.compress_model(
            config, output, resume=resume, overwrite=overwrite, progress=progress, model=model, tokenizer=tokenizer
        )
    start = time.perf_counter()
    solver_config = config.solver_config()
    device = resolve_device(config.device)
    inputs = read_inputs(config, model, tokenizer, "compress_model")
    spec = architecture_for(inputs.model_config)
    partial = prepare_output(Path(output), inputs.fingerprint(config, device), resume=resume, overwrite=overwrite)
    model = inputs.load_model(config, model)
    compress_blocks(
        model,
        spec,
        inputs.windows,
        solver_config,
        device=device,
        offload=config.offload,
        batch_size=config.batch_size,
        true_sequential=config.true_sequential,
        dense_inputs=config.pipeline == "dense-inputs",
        finished=partial.load_block,
        on_block=partial.save_block,
        progress=progress,
        values=config.value_quantization(),
    )
    info = run_info(config, device, model, inputs, start)
    return write_output(Path(output), model, inputs.tokenizer, spec, partial, info, inputs.source)


def run_info(
    config: CompressConfig, device: torch.device, model: nn.Module, inputs: RunInputs, start: float
) -> dict[str, Any]:
    """The settings recorded in the output's manifest and report (``start``: ``time.perf_counter()`` at the
    start of this invocation; a resumed run records the resumed part's seconds)."""
    return {
        **config.to_dict(),
        "device": str(device),
        "blocks": model.config.num_hidden_layers,
        "calibration_sha256": _sha256(inputs.text.encode()),
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "save_dtype": inputs.save_dtype(config),
    }
