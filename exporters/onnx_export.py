"""ONNX export of a compressed model with a KV cache, for generation in ONNX Runtime.

Inputs ``input_ids`` [batch, sequence] int64, ``attention_mask`` [batch, past + sequence] int64, ``position_ids``
[batch, sequence] int64 and ``past_key_values.{i}.key`` / ``.value`` [batch, kv_heads, past, head_dim]; outputs
``logits`` [batch, sequence, vocab] and ``present.{i}.key`` / ``.value`` [batch, kv_heads, past + sequence,
head_dim]: the convention of ONNX Runtime's generation tools. A first step feeds a past of length 0
(``exporters.onnx_generate``).

The model is loaded by ``dsf_runtime.from_pretrained``; every compressed linear is swapped for ``OnnxLinear``,
which holds the factors repacked into one ONNX layout (``csr``, ``bitmask`` or ``bsr``) as buffers named like the
directory's tensors (``model.layers.0.mlp.down_proj.A.col_idx``) and, while ``torch.onnx.export`` traces it, emits
one ``ai.dsf::DSFLinear`` or ``ai.dsf::SparseLinear`` node (``torch.onnx.ops.symbolic``) fed by those buffers as
ordinary initializers. The exporter is ``torch.onnx.export(..., dynamo=True)`` with dynamic batch, sequence and
past length, through ``CachedLM`` (a ``DynamicCache`` built from the past inputs). Weights go to external data
(``OUT.onnx.data``), so models above protobuf's 2 GB limit export too.

``lowering="standard"`` then rewrites the ``ai.dsf`` nodes into standard operators (``exporters.onnx_lowering``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import onnx
import torch
from torch import nn

from dsf_runtime.checkpoint import CompressedLayer, open_compressed
from dsf_runtime.loader import from_pretrained
from dsf_runtime.modules import FactorizedLinear, PackedFactor, SparseLinear, linear
from exporters._files import atomic_files, check_destination
from exporters.config import ExportConfig
from exporters.layouts import convert_layer
from exporters.onnx_generate import PAST, PRESENT, prefill_feed
from exporters.onnx_lowering import MIN_OPSET, lower_to_standard
from exporters.onnx_ops import (
    DOMAIN,
    DOMAIN_VERSION,
    DSF_LINEAR,
    ONNX_LAYOUTS,
    SPARSE_LINEAR,
    factor_inputs,
    make_session,
)

__all__ = ["LOWERINGS", "ONNX_DTYPES", "CachedLM", "OnnxLinear", "export_onnx", "layer_model", "prepare_for_onnx", "verify_onnx"]

logger = logging.getLogger(__name__)

LOWERINGS = ("custom", "standard")
ONNX_DTYPES = ("float32", "float16")  # numpy, and so ONNX Runtime's Python API, has no bfloat16
_IR_VERSION = 10  # what torch.onnx writes; onnxruntime 1.31 reads up to 13, onnx 1.23 writes 14 by default
# Example input of the trace; neither extent is 1, which torch.export would specialize.
_EXAMPLE_SHAPE = (2, 8)
_CHECK_TOKENS = 4  # tokens of the self-check run
# Largest |ONNX - torch| of the self-check, relative to max |torch logits|, by value dtype: well above rounding,
# well below what an index read out of range produces.
_CHECK_RTOL = {torch.float32: 1e-3, torch.float16: 5e-2}


class OnnxLinear(nn.Module):
    """A compressed linear that exports as one ``ai.dsf`` node and runs ``dsf_runtime.ops`` otherwise.

    Buffers: ``A.<part>`` and ``B.<part>`` (kind ``dsf``) or ``W.<part>`` (kind ``single``) in the layout's
    input order (``factor_inputs``), and ``bias`` [out] or None (a standard ``Add`` after the node).
    Shapes: ``x`` [..., in] -> [..., out], in the values' dtype.
    """

    def __init__(self, layer: CompressedLayer) -> None:
        super().__init__()
        layouts = {f.layout for f in layer.factors.values()}
        if len(layouts) != 1 or not layouts <= set(ONNX_LAYOUTS):
            raise ValueError(
                f"factors in layouts {sorted(layouts)}; the ONNX export needs one of {sorted(ONNX_LAYOUTS)}"
            )
        self.layout = layouts.pop()
        self.kind = layer.kind
        self.out_features, self.in_features = layer.shape
        for name, packed in layer.factors.items():
            self.add_module(name, PackedFactor(packed))
        self.register_buffer("bias", layer.bias)
        first = next(iter(layer.factors.values()))
        self.block_size = int(getattr(first, "block_size", 0)) if self.layout == "bsr" else 0

    @property
    def op_type(self) -> str:
        return DSF_LINEAR if self.kind == "dsf" else SPARSE_LINEAR

    def node_inputs(self) -> dict[str, torch.Tensor]:
        """The node's inputs after ``X``, in order: ``{"A.values": ..., "A.col_idx": ..., ...}``."""
        parts = factor_inputs(self.layout)
        names = ("A", "B") if self.kind == "dsf" else ("W",)
        return {f"{n}.{part}": getattr(self.get_submodule(n), part) for n in names for part in parts}

    def node_attributes(self) -> dict[str, int | str]:
        """The node's attributes (``layout``, ``out_features``, ``in_features``, ``block_size``, ``inner_dim``)."""
        attrs: dict[str, int | str] = {"layout": self.layout, "out_features": self.out_features,
                                       "in_features": self.in_features, "block_size": self.block_size}
        if self.kind == "dsf":
            attrs["inner_dim"] = self.A.shape[1]
        return attrs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            inputs = (x, *self.node_inputs().values())
            y = torch.onnx.ops.symbolic(
                f"{DOMAIN}::{self.op_type}", inputs, self.node_attributes(), dtype=x.dtype,
                shape=(*x.shape[:-1], self.out_features), version=DOMAIN_VERSION,
            )
            return y if self.bias is None else y + self.bias
        factors = [self.A.packed(), self.B.packed()] if self.kind == "dsf" else [self.W.packed()]
        return linear(x, factors, self.bias)


def layer_model(
    layer: CompressedLayer, config: ExportConfig | None = None, *, opset: int = MIN_OPSET
) -> onnx.ModelProto:
    """A standalone model of one compressed layer, ``x`` [n, in] -> ``y`` [n, out] in the values' dtype: the
    ``ai.dsf`` node the model export emits (factors repacked into ``config.layout``), plus an ``Add`` for a bias.
    For tests and benchmarks of single layers; ``lower_to_standard`` applies as to whole models.

    Raises:
        ValueError: a layout or dtype without an ONNX encoding, or ``opset`` < 18.
    """
    config = config or ExportConfig(layout="bitmask")
    _check_options(config, "custom", opset)
    module = OnnxLinear(convert_layer(layer, config))
    factors = module.node_inputs()
    tensors = {**factors, **({} if module.bias is None else {"bias": module.bias})}
    values = next(iter(factors.values()))
    elem = onnx.helper.np_dtype_to_tensor_dtype(values.numpy().dtype)
    linear_out = "y" if module.bias is None else "y_without_bias"
    nodes = [onnx.helper.make_node(module.op_type, ["x", *factors], [linear_out], name="linear", domain=DOMAIN,
                                   **module.node_attributes())]
    if module.bias is not None:
        nodes.append(onnx.helper.make_node("Add", [linear_out, "bias"], ["y"], name="bias"))
    graph = onnx.helper.make_graph(
        nodes, "dsf_linear",
        [onnx.helper.make_tensor_value_info("x", elem, ["n", module.in_features])],
        [onnx.helper.make_tensor_value_info("y", elem, ["n", module.out_features])],
        initializer=[onnx.numpy_helper.from_array(t.numpy(), name) for name, t in tensors.items()],
    )
    opsets = [onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    return onnx.helper.make_model(graph, opset_imports=opsets, ir_version=_IR_VERSION)


def _layer_of(module: FactorizedLinear | SparseLinear) -> CompressedLayer:
    shape = (module.out_features, module.in_features)
    if isinstance(module, FactorizedLinear):
        factors = {"A": module.A.packed(), "B": module.B.packed()}
        return CompressedLayer("dsf", shape, factors, "export", module.bias)
    return CompressedLayer("single", shape, {"W": module.W.packed()}, "export", module.bias)


def _graph_dtype(src: Path, config: ExportConfig) -> torch.dtype | None:
    """The dtype the model is loaded in for the export: ``--dtype``, else the scales' dtype when factors hold
    quantized codes (the ONNX encodings carry float values, so codes are decoded), else None (as stored)."""
    if config.torch_dtype is not None:
        return config.torch_dtype
    with open_compressed(src) as ckpt:
        scale_dtypes = {f["scale_dtype"] for e in ckpt.layers.values() for f in e["factors"].values()
                        if f.get("scale_dtype")}
    return getattr(torch, sorted(scale_dtypes)[0]) if scale_dtypes else None


def prepare_for_onnx(model: nn.Module, config: ExportConfig) -> int:
    """Swap every ``FactorizedLinear``/``SparseLinear`` of ``model`` (in place) for an ``OnnxLinear`` with its
    factors repacked into ``config.layout``; returns how many were swapped."""
    names = [n for n, m in model.named_modules() if isinstance(m, (FactorizedLinear, SparseLinear))]
    for name in names:
        parent, _, child = name.rpartition(".")
        layer = convert_layer(_layer_of(model.get_submodule(name)), config)
        setattr(model.get_submodule(parent), child, OnnxLinear(layer))
    return len(names)


class CachedLM:
    """A causal LM's forward with its KV cache as flat tensors, for the export: ``forward(input_ids,
    attention_mask, position_ids, *past)`` -> ``(logits, *present)``, ``past``/``present`` ordered layer 0 key,
    layer 0 value, ... each [batch, kv_heads, length, head_dim]. ``attach`` installs it as the model's own
    ``forward`` (so parameter names, hence ONNX initializer names, stay the model's); ``detach`` restores it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = model.config.num_hidden_layers
        self._original = None

    def attach(self) -> None:
        self._original = self.model.forward
        self.model.forward = self.forward

    def detach(self) -> None:
        del self.model.forward  # the instance attribute; the class's forward shows again

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self._original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)

    def names(self) -> tuple[list[str], list[str]]:
        """ONNX input and output names (``exporters.onnx_generate``'s convention)."""
        kinds = [(i, k) for i in range(self.layers) for k in ("key", "value")]
        return (["input_ids", "attention_mask", "position_ids"] + [PAST.format(layer=i, kind=k) for i, k in kinds],
                ["logits"] + [PRESENT.format(layer=i, kind=k) for i, k in kinds])

    def example(self) -> tuple[tuple, tuple]:
        """Example inputs (batch 2, 3 new tokens after 2 cached) and their dynamic shapes."""
        config = self.model.config
        heads = config.num_key_value_heads or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(t for t in self.model.parameters() if t.is_floating_point()).dtype
        batch, new, cached = _EXAMPLE_SHAPE[0], 3, 2
        past = tuple(torch.zeros(batch, heads, cached, head_dim, dtype=dtype) for _ in range(2 * self.layers))
        inputs = (torch.zeros(batch, new, dtype=torch.long), torch.ones(batch, cached + new, dtype=torch.long),
                  torch.arange(cached, cached + new).expand(batch, new), *past)
        b, s, p, t = (torch.export.Dim(n) for n in ("batch", "sequence", "past", "total"))
        shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
        return inputs, shapes


def _check_options(config: ExportConfig, lowering: str, opset: int) -> None:
    problems = []
    if config.layout not in ONNX_LAYOUTS:
        layouts = ", ".join(sorted(ONNX_LAYOUTS))
        problems.append(f"--layout {config.layout!r} has no ONNX encoding; use one of {layouts}")
    if config.dtype is not None and config.dtype not in ONNX_DTYPES:
        problems.append(f"--dtype {config.dtype!r} is not supported by the ONNX export; use {' or '.join(ONNX_DTYPES)}")
    if lowering not in LOWERINGS:
        problems.append(f"--lowering {lowering!r} is not a lowering; expected one of {', '.join(LOWERINGS)}")
    if opset < MIN_OPSET:
        problems.append(f"--opset {opset} is too old; the export needs opset >= {MIN_OPSET}")
    if problems:
        raise ValueError("; ".join(problems))


def verify_onnx(path: Path, model: nn.Module, name: Path | None = None) -> float | None:
    """Check an exported model: ``onnx.checker`` on ``path`` (external data included), then one ONNX Runtime run
    of ``_CHECK_TOKENS`` tokens against ``model`` (the torch model it was exported from). The run is skipped, with
    a warning, when a custom-op model cannot run here because onnxruntime-extensions is missing.

    Args:
        path: the ``.onnx`` file (its ``.data`` next to it).
        model: the prepared torch model (``prepare_for_onnx``).
        name: the path to name in errors (default ``path``).

    Returns:
        The largest absolute logit difference, or None when the run was skipped.

    Raises:
        ValueError: naming the file when the checker refuses it or the logits differ beyond ``_CHECK_RTOL``.
    """
    name = name or path
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"{name}: the exported model fails onnx.checker ({exc}); report this as a bug") from exc
    try:
        session = make_session(path)
    except ImportError as exc:
        logger.warning("%s: not run in ONNX Runtime after export: %s", name, exc)
        return None
    ids = torch.arange(_CHECK_TOKENS).remainder(model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
    got = torch.from_numpy(session.run(["logits"], prefill_feed(session, ids.numpy()))[0]).float()
    diff = float((got - want).abs().max()) if got.shape == want.shape else math.inf
    limit = _CHECK_RTOL.get(model.dtype, _CHECK_RTOL[torch.float16]) * float(want.abs().max())
    if not diff <= limit:
        raise ValueError(f"{name}: the exported model's logits differ from torch's by {diff:.3g} (allowed "
                         f"{limit:.3g}) on {_CHECK_TOKENS} tokens; the export is wrong, report this as a bug")
    return diff


def export_onnx(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: ExportConfig | None = None,
    *,
    lowering: str = "custom",
    opset: int = MIN_OPSET,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Export the compressed model in ``src`` to ``out`` (``.onnx``) plus ``out.data`` (external weights).

    Args:
        src: a compressed directory (any layout).
        out: the ``.onnx`` path; both files are written to a temporary directory and moved into place, the
            ``.onnx`` last.
        config: layout (``csr``, ``bitmask`` or ``bsr``; default ``bitmask``), dtype (``float32``/``float16``, None
            keeps the stored one) and bsr block size. ``max_shard_size`` is not used.
        lowering: ``custom`` (``ai.dsf`` nodes; run with ``exporters.onnx_ops.make_session``) or ``standard``
            (standard operators only; any ONNX Runtime).
        opset: default-domain opset, at least 18.
        overwrite: replace an existing ``out``.
        verify: check the written model before it is moved into place (``verify_onnx``: ``onnx.checker`` and one
            ONNX Runtime run against torch).

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: a bad option (naming its flag), ``out`` inside ``src``, or the written model fails
            ``verify_onnx`` (nothing is moved into place). CheckpointError: ``src`` is incomplete or invalid.
            FileExistsError: ``out`` exists and ``overwrite`` is False.
    """
    config = config or ExportConfig(layout="bitmask")
    _check_options(config, lowering, opset)
    src, out = Path(src), Path(out)
    check_destination(out, overwrite=overwrite, sources=(src,))  # before the minutes of loading and tracing
    model = from_pretrained(src, device="cpu", dtype=_graph_dtype(src, config), float32_on_cpu=False)  # one dtype
    swapped = prepare_for_onnx(model, config)
    cached = CachedLM(model)
    inputs, shapes = cached.example()
    input_names, output_names = cached.names()
    with atomic_files(out, overwrite=overwrite, sources=(src,)) as staging:
        cached.attach()
        try:
            program = torch.onnx.export(
                model, inputs, dynamo=True, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_shapes=shapes, external_data=True, verbose=False,
            )
        finally:
            cached.detach()
        path = staging / out.name
        program.save(str(path), external_data=True)
        if lowering == "standard":  # rewrites the graph only; the weights stay in out.data
            proto = lower_to_standard(onnx.load(str(path), load_external_data=False))
            onnx.save_model(proto, str(path))
        if verify:
            verify_onnx(path, model, out)
    logger.info("exported %s -> %s (%d compressed linears, layout %s, lowering %s, opset %d)",
                src, out, swapped, config.layout, lowering, opset)
    return out
