"""The block-sequential calibration driver: the only code that walks a model block by block.

For each decoder block ``i`` (inputs = outputs of the already compressed blocks ``0..i-1``):

1. move the block to the compute device;
2. one forward pass over the calibration chunks with a hook per group of linears sharing an input, which
   accumulates that group's Hessian ``H = (2/N)·Σ xxᵀ`` (with ``true_sequential``, one pass per group, each
   group compressed before the next group's H is collected). Each hook call's ``XᵀX`` is computed on its own and
   the partials are added in call (= chunk) order (``GramSum``): the order of the sums, not which process ran
   which chunk, fixes the bits, so ``compress.distributed`` (chunks sharded across ranks, partials added on the
   owner in the same order) gives the same H as one process;
3. solve each group (``compress.solvers.solve_group``) and write ``W ≈ A·B`` back as the dense weight;
4. a second forward pass of the compressed block produces block ``i+1``'s inputs;
5. move the block back to where the model lives.

The first block's inputs are captured generically with a forward pre-hook (``with_kwargs=True``) on block 0
that records the hidden states together with every keyword argument the model passes (attention mask,
``position_ids``, rotary ``position_embeddings``, ...) and stops the forward. Blocks already finished by an
interrupted run are replayed from their stored factors, which makes a resumed run bit-identical to an
uninterrupted one on the same device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from compress.architectures import ArchitectureSpec, block_groups, decoder_blocks
from compress.quantize import ValueQuantization
from compress.solvers import solve_group
from compress.solvers.base import SolveResult, SolverConfig

__all__ = [
    "BlockInputs",
    "BlockSolver",
    "GramSum",
    "collect_grams",
    "input_gram",
    "OffloadMode",
    "activation_storage",
    "capture_block_inputs",
    "run_block",
    "write_back",
    "compress_blocks",
]

logger = logging.getLogger(__name__)

OffloadMode = Literal["auto", "always", "never"]
# "auto" keeps activations on the accelerator while inputs + outputs take at most this share of its free memory.
_AUTO_OFFLOAD_SHARE = 0.5


@dataclass
class BlockInputs:
    """Inputs of one decoder block for every calibration chunk.

    Attributes:
        hidden: per chunk, the hidden states ``[b, S, H]`` (on the storage device).
        args: per chunk, further positional arguments of the block call (usually empty).
        kwargs: per chunk, the keyword arguments of the block call (attention mask, position ids, rotary
            ``position_embeddings`` as ``(cos, sin)`` each ``[1, S, D]``, ...), identical for every block.
    """

    hidden: list[torch.Tensor]
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]


# solve_block(index, block, groups, inputs, report) -> results: compresses one block (on the compute device) whose
# inputs are `inputs`, writes the factors back and calls report(name, result) per linear (compress.distributed).
BlockSolver = Callable[
    [int, nn.Module, list[list[tuple[str, nn.Linear]]], BlockInputs, Callable[[str, SolveResult], None]],
    dict[str, SolveResult],
]


class _InputsCaught(Exception):
    """Raised by the capture hook to stop the model forward after block 0's inputs are recorded."""


class _GroupInputSeen(Exception):
    """Raised by a Hessian hook to stop a block forward once the last group's input was accumulated."""


def _to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def activation_storage(
    offload: OffloadMode, device: torch.device, samples: int, seqlen: int, hidden_size: int, dtype: torch.dtype
) -> torch.device:
    """Where calibration activations live: ``device`` or the CPU.

    ``"always"`` -> CPU, ``"never"`` -> ``device``; ``"auto"`` keeps them on an accelerator when one block's
    inputs plus outputs (``2 · samples · seqlen · hidden_size`` elements) take at most half of its free memory.
    """
    if offload == "always":
        return torch.device("cpu")
    if offload == "never" or device.type == "cpu":
        return device
    needed = 2 * samples * seqlen * hidden_size * torch.empty((), dtype=dtype).element_size()
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    storage = device if needed <= _AUTO_OFFLOAD_SHARE * free else torch.device("cpu")
    logger.info("calibration activations: %.1f MiB, kept on %s", needed / 2**20, storage)
    return storage


def _move_outside_blocks(model: nn.Module, blocks_path: str, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder block to ``device`` (tied weights once)."""
    for name, module in model.named_modules():
        if name == blocks_path or name.startswith(blocks_path + "."):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for key, buf in module.named_buffers(recurse=False):
            module._buffers[key] = buf.to(device)


def capture_block_inputs(
    model: nn.Module,
    spec: ArchitectureSpec,
    windows: torch.Tensor,
    *,
    device: torch.device,
    storage: torch.device,
    batch_size: int,
) -> BlockInputs:
    """Inputs of the first decoder block for each chunk of ``batch_size`` windows.

    Only the modules before the blocks (embeddings, rotary embedding, ...) run, on ``device``; they are moved
    back to where the model lives afterwards.

    Args:
        model: a ``*ForCausalLM`` model.
        spec: its architecture spec.
        windows: ``[N, S]`` token ids.
        device: compute device.
        storage: where the captured tensors are kept.
        batch_size: windows per forward chunk.
    """
    blocks = decoder_blocks(model, spec)
    home = next(blocks[0].parameters()).device
    captured = BlockInputs([], [], [])

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.to(storage))
        captured.args.append(_to(tuple(args[1:]), storage))
        captured.kwargs.append(_to(kwargs, storage))
        raise _InputsCaught

    _move_outside_blocks(model, spec.blocks, device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for chunk in windows.split(batch_size):
                try:
                    model(input_ids=chunk.to(device), use_cache=False)
                except _InputsCaught:
                    continue
                raise RuntimeError(f"{spec.blocks}.0 was never called by the model's forward")
    finally:
        handle.remove()
        _move_outside_blocks(model, spec.blocks, home)
    return captured


def _block_output(out: Any) -> torch.Tensor:
    # transformers 5 blocks return a tensor; older ones and some architectures a tuple (hidden, ...).
    return out[0] if isinstance(out, (tuple, list)) else out


def _forward_chunks(
    block: nn.Module, inputs: BlockInputs, device: torch.device, stop: type[Exception] | None = None
) -> Iterator[torch.Tensor | None]:
    """Yield the block's output for each chunk (``None`` when the forward was stopped by ``stop``)."""
    stopped = stop or ()  # `except ()` catches nothing
    for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
        try:
            out = _block_output(block(hidden.to(device), *_to(args, device), **_to(kwargs, device)))
        except stopped:
            out = None
        yield out


def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device, storage: torch.device) -> BlockInputs:
    """Run ``block`` (already on ``device``) over every chunk; its outputs are the next block's inputs."""
    with torch.inference_mode():
        hidden = [out.to(storage) for out in _forward_chunks(block, inputs, device)]
    return BlockInputs(hidden, inputs.args, inputs.kwargs)


def input_gram(x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """One hook call's Hessian partial.

    Args:
        x: a linear's input ``[t, ..., in]`` (``t`` samples), ``[tokens, in]`` or ``[in]`` (one sample), any float
            dtype (the sample rule of ``compress.hessian.HessianAccumulator``).
        device: where the partial is computed.

    Returns:
        ``(XᵀX [in, in] fp32 on device, samples)`` with ``X`` the input's rows ``[rows, in]`` in fp32.
    """
    rows = x.reshape(-1, x.shape[-1]).to(device, torch.float32)
    return torch.mm(rows.T, rows), (x.shape[0] if x.dim() >= 3 else 1)


class GramSum:
    """``H = (2/N)·Σ_c X_cᵀX_c`` [in, in] fp32, the partials added one by one in the caller's order.

    Args:
        in_features: width of the layer input.
        device: where ``H`` lives.
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.total = torch.zeros(in_features, in_features, device=device)

    @torch.inference_mode()  # partials and the sum may come from inside or outside inference mode
    def add(self, gram: torch.Tensor) -> None:
        """Add one partial ``XᵀX`` [in, in] fp32."""
        self.total.add_(gram)

    @torch.inference_mode()
    def hessian(self, samples: int) -> torch.Tensor:
        """The finished ``H`` (scaled in place by ``2 / samples``; the sum is not usable afterwards)."""
        return self.total.mul_(2 / samples)


def collect_grams(
    block: nn.Module,
    groups: list[list[tuple[str, nn.Linear]]],
    inputs: BlockInputs,
    device: torch.device,
    sink: Callable[[int, torch.Tensor, int], None],
) -> None:
    """One forward pass over ``inputs``' chunks; every call of each group's first linear gives
    ``sink(position, gram, samples)`` (``input_gram`` of its input; ``position``: the group's index in ``groups``),
    in call order.

    Groups are in compute order, so the forward of a chunk stops as soon as the last group's input was seen
    (the rest of the block, e.g. ``down_proj`` and the residual, is not needed).
    """
    handles = []
    for position, group in enumerate(groups):
        last = position == len(groups) - 1

        def hook(module: nn.Module, args: tuple, position: int = position, last: bool = last) -> None:
            sink(position, *input_gram(args[0], device))
            if last:
                raise _GroupInputSeen

        handles.append(group[0][1].register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for _ in _forward_chunks(block, inputs, device, _GroupInputSeen):
                pass
    finally:
        for handle in handles:
            handle.remove()


def _collect_hessians(
    block: nn.Module, groups: list[list[tuple[str, nn.Linear]]], inputs: BlockInputs, device: torch.device
) -> list[torch.Tensor]:
    """``H`` [in, in] of each group from the input of its first linear (``collect_grams``, summed in call order)."""
    sums = [GramSum(group[0][1].in_features, device) for group in groups]
    samples = [0] * len(groups)

    def sink(position: int, gram: torch.Tensor, count: int) -> None:
        sums[position].add(gram)
        samples[position] += count

    collect_grams(block, groups, inputs, device, sink)
    return [total.hessian(count) for total, count in zip(sums, samples)]


def write_back(linear: nn.Linear, kind: str, factors: Mapping[str, torch.Tensor]) -> None:
    """Set ``linear.weight`` to the dense matrix the factors represent (``A·B`` or ``W``), in its dtype.

    The product is computed on the weight's device from contiguous factors, so the result depends only on the
    factor values: stored and freshly solved factors give bit-identical weights.
    """
    weight = linear.weight
    if kind == "dsf":
        dense = factors["A"].to(weight.device).contiguous() @ factors["B"].to(weight.device).contiguous()
    else:
        dense = factors["W"].to(weight.device)
    with torch.no_grad():
        weight.copy_(dense.to(weight.dtype))


def _solve_groups(
    groups: list[list[tuple[str, nn.Linear]]],
    hessians: list[torch.Tensor],
    solver_config: SolverConfig,
    report: Callable[[str, SolveResult], None],
    values: ValueQuantization | None = None,
) -> dict[str, SolveResult]:
    results: dict[str, SolveResult] = {}
    for group, hessian in zip(groups, hessians):
        weights = [linear.weight.detach().float() for _, linear in group]
        names = [name for name, _ in group]
        with torch.inference_mode():
            solved = solve_group(weights, hessian, solver_config, layer_names=names)
            if values is not None:
                solved = [values.apply(r, w, hessian, n) for r, w, n in zip(solved, weights, names)]
        for (name, linear), result in zip(group, solved):
            write_back(linear, result.kind, result.factors)
            results[name] = result
            report(name, result)
    return results


def compress_blocks(
    model: nn.Module,
    spec: ArchitectureSpec,
    windows: torch.Tensor,
    solver_config: SolverConfig,
    *,
    device: torch.device,
    offload: OffloadMode = "auto",
    batch_size: int = 8,
    true_sequential: bool = False,
    dense_inputs: bool = False,
    finished: Callable[[int, Mapping[str, nn.Linear]], Mapping[str, SolveResult] | None] = lambda index, linears: None,
    on_block: Callable[[int, dict[str, SolveResult]], None] = lambda index, results: None,
    progress: bool = True,
    solve_block: BlockSolver | None = None,
    values: ValueQuantization | None = None,
) -> BlockInputs:
    """Compress every linear of every decoder block in place, block by block.

    Args:
        model: a ``*ForCausalLM`` model; it stays where it is, one block at a time visits ``device``.
        spec: its architecture spec (``compress.architectures.architecture_for``).
        windows: calibration token ids ``[N, S]``.
        solver_config: from ``compress.solvers.make_config``.
        device: compute device.
        offload: where activations live, see ``activation_storage``.
        batch_size: windows per forward chunk.
        true_sequential: compress the groups of a block one after another, each group's H collected with the
            earlier groups already compressed (one extra partial forward per group); default: all groups of a
            block collect H in one pass before any is compressed (the reference's default).
        dense_inputs: calibrate every block on the dense model's activations: a block's outputs are computed
            before it is compressed. Default (the reference): on the outputs of the already compressed blocks.
        finished: ``finished(i, linears)`` returns the stored results of block ``i`` (whose linears by name are
            ``linears``) from an interrupted run, or None; stored blocks are written back and replayed instead of
            solved.
        on_block: called with ``(i, results)`` after block ``i`` was solved (not for replayed blocks).
        progress: show a progress bar on stderr.
        solve_block: compresses one block instead of this process alone (``compress.distributed``); ``windows``
            are then this rank's shard.
        values: quantize each solved layer's values (``compress.quantize.ValueQuantization``: int8/fp8/int4, by
            error feedback under its H or round-to-nearest) before writing it back, so later blocks calibrate on the quantized model;
            None keeps them in fp32.

    Returns:
        The last block's outputs (hidden states before the final norm), per chunk ``[b, S, H]``.
    """
    blocks = decoder_blocks(model, spec)
    all_groups = [block_groups(block, spec, f"{spec.blocks}.{i}") for i, block in enumerate(blocks)]  # fail early
    home = next(blocks[0].parameters()).device
    storage = activation_storage(
        offload, device, windows.shape[0], windows.shape[1], model.config.hidden_size, next(model.parameters()).dtype
    )
    inputs = capture_block_inputs(model, spec, windows, device=device, storage=storage, batch_size=batch_size)
    per_block = sum(len(names) for names in spec.groups)
    with logging_redirect_tqdm(), tqdm(
        total=len(blocks) * per_block, desc="compress", unit="layer", disable=not progress
    ) as bar:

        def report(name: str, result: SolveResult) -> None:
            logger.info(
                "%s: relative error %.5f, nnz %d, %.2f s", name, result.relative_error, result.nnz, result.seconds
            )
            bar.set_postfix_str(f"{name} rel. error {result.relative_error:.4f}")
            bar.update()

        for index, (block, groups) in enumerate(zip(blocks, all_groups)):
            block.to(device)
            dense_outputs = run_block(block, inputs, device, storage) if dense_inputs else None
            stored = finished(index, {name: linear for group in groups for name, linear in group})
            if stored is not None:
                for group in groups:
                    for name, linear in group:
                        write_back(linear, stored[name].kind, stored[name].factors)
                logger.info("block %d: replayed from the stored factors of the interrupted run", index)
                bar.update(per_block)
            elif solve_block is not None:
                on_block(index, solve_block(index, block, groups, inputs, report))
            else:
                on_block(index, _compress_block(block, groups, inputs, solver_config, device, true_sequential, report,
                                                values))
            inputs = dense_outputs if dense_inputs else run_block(block, inputs, device, storage)
            block.to(home)
    return inputs


def _compress_block(
    block: nn.Module,
    groups: list[list[tuple[str, nn.Linear]]],
    inputs: BlockInputs,
    solver_config: SolverConfig,
    device: torch.device,
    true_sequential: bool,
    report: Callable[[str, SolveResult], None],
    values: ValueQuantization | None = None,
) -> dict[str, SolveResult]:
    """Collect H and solve (and with ``values`` quantize) every group of one block (the block is on ``device``)."""
    if not true_sequential:
        hessians = _collect_hessians(block, groups, inputs, device)
        return _solve_groups(groups, hessians, solver_config, report, values)
    results: dict[str, SolveResult] = {}
    for group in groups:
        hessians = _collect_hessians(block, [group], inputs, device)
        results.update(_solve_groups([group], hessians, solver_config, report, values))
    return results
