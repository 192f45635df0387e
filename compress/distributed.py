"""Block-sequential compression across ``torch.distributed`` ranks (``dsf compress --nproc N``, or any torchrun).

Every rank loads the model and the calibration windows; the pipeline of ``compress.calibration`` runs on every
rank with these changes (``compress_model``, ``solve_block``):

* **shards**: the calibration chunks (``batch_size`` windows each, the same chunks as one process) are split into
  contiguous ranges, one per rank (``chunk_range``); each rank captures, forwards and accumulates only its own;
* **solve units and owners**: each group of linears sharing an input is split into its same-shape members, a
  layer of over 2^26 weights alone (``solve_units``: exactly the batches ``solve_dsf_group`` solves together),
  and each unit is owned by one rank, by bin-packing the cost ``members·out·in·min(out, in)`` (largest first
  onto the least-loaded rank, ties to the lower rank: ``assign_owners``);
* **Hessians**: every hook call's ``XᵀX`` (``compress.calibration.input_gram``) is kept; each owner receives the
  partials of its units' group from every rank in rank order and adds them one by one in that order, which is
  the chunk order, then scales by ``2/N`` (``N``: the sample count, summed exactly as integers);
* the owners solve their units (in parallel across ranks) and broadcast the factors unit by unit; every rank
  writes them back and runs its shard through the compressed block for the next block's inputs;
* rank 0 alone prepares the output, writes the per-block partial state and the final output exactly as one
  process does (``compress.output``); the finished blocks are read from the partial state by every rank, so a
  run resumes after the crash of any rank, with any number of ranks.

**Equality with one process.** One process adds the same partials in the same order (``GramSum``), and solves the
same units with the same code, so for the same calibration chunks every H, mask and factor is bit-identical for
1, 2, 3, ... ranks, provided each chunk's forward and each solve compute identically in every process: the same
device type, library build and number of threads per process (multi-threaded CPU GEMMs, or another GPU model,
may round differently). The tests check bit-equality of every factor for 1 and 2 processes of one thread each.

**Failures.** Collectives run under the process group's timeout (``DSF_DIST_TIMEOUT`` seconds, default 600; it
must exceed the longest solve of one rank in one block, which the others wait for). A collective that fails (a
peer died: its connection closed; or nothing came within the timeout) raises ``PeerFailure`` naming this rank,
the collective and the ranks that did not answer a roll call through the rendezvous store. On NCCL, an operation
stuck on a dead peer is ended by NCCL's watchdog after the same timeout. Under torchrun, the launcher also ends
the remaining ranks as soon as one exits with an error.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from compress.api import ConfigError, CompressConfig, read_inputs, resolve_device, run_info
from compress.architectures import architecture_for
from compress.calibration import BlockInputs, GramSum, collect_grams, compress_blocks, write_back
from compress.output import PartialRun, prepare_output, write_output
from compress.solvers import solve_group
from compress.solvers.base import SolveResult, SolverConfig
from compress.solvers.dsf import solve_batches

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "PeerFailure",
    "Ranks",
    "SolveUnit",
    "assign_owners",
    "chunk_range",
    "compress_model",
    "launched_world",
    "maybe_relaunch",
    "relaunch_command",
    "solve_units",
]

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "DSF_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
_ROLL_CALL_KEY = "dsf/roll-call/{}"
_ROLL_CALL_MAX_S = 10.0

Group = list[tuple[str, nn.Linear]]


class PeerFailure(RuntimeError):
    """A collective failed on this rank: a peer rank died, or nothing came within the collective timeout."""


# ---------------------------------------------------------------------------------------------------- launching


def launched_world() -> int | None:
    """``WORLD_SIZE`` of a torchrun launch (``RANK`` and ``WORLD_SIZE`` set in the environment), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def relaunch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command running ``dsf <argv>`` (without ``--nproc``) on ``nproc`` local ranks.

    torchrun sets ``OMP_NUM_THREADS=1`` per rank unless the environment sets it.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "dsf_cli.main", *_without_nproc(argv)]


def maybe_relaunch(nproc: int, argv: Sequence[str]) -> int | None:
    """For ``dsf compress --nproc N``: run the same command under torchrun on ``nproc`` ranks.

    Args:
        nproc: ranks requested (1: this process).
        argv: the command line after the program name (``sys.argv[1:]``).

    Returns:
        torchrun's exit status when it ran the command; None when the caller runs in place (``nproc`` 1, or this
        process already is a rank of a torchrun launch with ``nproc`` ranks).

    Raises:
        ConfigError: ``nproc`` below 1, or different from ``WORLD_SIZE`` under torchrun.
    """
    if nproc < 1:
        raise ConfigError("nproc", f"must be ≥ 1, got {nproc}")
    world = launched_world()
    if world is not None:
        if nproc not in (1, world):
            raise ConfigError("nproc", f"{nproc} under torchrun with WORLD_SIZE={world}; drop --nproc there")
        return None
    if nproc == 1:
        return None
    return subprocess.run(relaunch_command(nproc, argv), check=False).returncode


# ------------------------------------------------------------------------------------ sharding and ownership


def chunk_range(chunks: int, world: int, rank: int) -> range:
    """The contiguous calibration chunks of ``rank``: ``[rank·chunks // world, (rank+1)·chunks // world)``."""
    return range(rank * chunks // world, (rank + 1) * chunks // world)


@dataclass(frozen=True)
class SolveUnit:
    """Linears solved by one ``solve_group`` call on one rank.

    Attributes:
        group: index of their Hessian group (the linears sharing one input) in the stage.
        members: ``(name, linear)`` of the same-shape members, in the group's order.
    """

    group: int
    members: tuple[tuple[str, nn.Linear], ...]

    @property
    def cost(self) -> float:
        """Solve-cost proxy: ``members · out · in · min(out, in)`` (DSF's inner dimension is ``min(out, in)``)."""
        out_features, in_features = self.members[0][1].weight.shape
        return float(len(self.members) * out_features * in_features * min(out_features, in_features))


def solve_units(groups: Sequence[Group]) -> list[SolveUnit]:
    """Each group's batches (``compress.solvers.dsf.solve_batches``: same-shape members, large layers alone) as
    units, groups in order.

    These are the batches ``solve_dsf_group`` solves together (other methods solve layer by layer), so solving the
    units one by one computes exactly what one ``solve_group`` call per group computes.
    """
    units = []
    for index, group in enumerate(groups):
        batches = solve_batches([tuple(linear.weight.shape) for _, linear in group])
        units.extend(SolveUnit(index, tuple(group[i] for i in batch)) for batch in batches)
    return units


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each unit: largest cost first (ties: earlier unit) onto the least-loaded rank (ties: lower
    rank). Deterministic, so every rank computes the same owners."""
    loads = [0.0] * world
    owners = [0] * len(costs)
    for unit in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[unit] = rank
        loads[rank] += costs[unit]
    return owners


# ---------------------------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch.

    Attributes:
        rank: this rank; world: the number of ranks.
        device: the compute device (``cuda:LOCAL_RANK`` on CUDA).
        timeout_s: the collective timeout.
        joined: whether this run created the process group (and destroys it when it finishes).
    """

    rank: int
    world: int
    device: torch.device
    timeout_s: float
    joined: bool

    @property
    def comm_device(self) -> torch.device:
        """Where tensors are communicated: the compute device on NCCL, the CPU on gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def fail(self, what: str, exc: BaseException, started: float) -> PeerFailure:
        """The error of a failed collective ``what`` (begun at ``time.monotonic()`` = ``started``), naming the
        ranks that miss a roll call through the rendezvous store."""
        elapsed = time.monotonic() - started
        missing = _roll_call(self.rank, self.world, min(_ROLL_CALL_MAX_S, self.timeout_s / 4))
        if missing is None:
            who = "the rendezvous store is unreachable (its host, rank 0 or torchrun, died)"
        elif missing:
            who = f"rank(s) {', '.join(map(str, missing))} did not answer a roll call (died, or stalled elsewhere)"
        else:
            who = "every rank answered a roll call"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return PeerFailure(
            f"rank {self.rank} of {self.world}: {what} failed after {elapsed:.1f} s "
            f"(collective timeout {self.timeout_s:.0f} s, {TIMEOUT_ENV}): {who}; {detail}"
        )


def _roll_call(rank: int, world: int, wait_s: float) -> list[int] | None:
    """Check in at the rendezvous store and wait up to ``wait_s`` for the others: the ranks that never checked in
    (None when the store cannot be reached)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(_ROLL_CALL_KEY.format(rank), "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world) if not store.check([_ROLL_CALL_KEY.format(r)])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except (RuntimeError, ValueError):  # no store, or its host died
        return None


@contextmanager
def _collective(ranks: Ranks, what: str) -> Iterator[None]:
    """Run communication; a failure becomes ``PeerFailure`` naming ``what``."""
    started = time.monotonic()
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistError and the backends' errors
        raise ranks.fail(what, exc, started) from exc


def _timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise ConfigError("dist_timeout", f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return timeout


def _start(device: str) -> Ranks:
    """Join the launch's process group (env:// rendezvous; NCCL on CUDA, gloo on CPU) unless already joined."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    compute = resolve_device(device)
    if compute.type == "cuda":
        compute = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(compute)
    timeout = _timeout_s()
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if compute.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    return Ranks(rank, world, compute, timeout, joined)


# -------------------------------------------------------------------------------------------- one block's solve


def _gather_counts(ranks: Ranks, grams: list[list[torch.Tensor]], samples: list[int], what: str) -> torch.Tensor:
    """Every rank's ``(number of partials, samples)`` per group: int64 [world, groups, 2] (CPU)."""
    local = torch.tensor([[len(g), n] for g, n in zip(grams, samples)], dtype=torch.int64, device=ranks.comm_device)
    gathered = [torch.empty_like(local) for _ in range(ranks.world)]
    with _collective(ranks, f"gathering the Hessian partial counts of {what}"):
        dist.all_gather(gathered, local)
    return torch.stack(gathered).cpu()


def _reduce_to_owner(
    ranks: Ranks, owner: int, grams: list[torch.Tensor], counts: torch.Tensor, in_features: int, what: str
) -> torch.Tensor | None:
    """The owner's ``H`` [in, in] fp32: every rank's partials, received in rank order (= chunk order) and added one
    by one (``GramSum``); None on the other ranks, which send theirs.

    Args:
        grams: this rank's partials of the group, in call order.
        counts: int64 [world, 2]: each rank's number of partials and samples of the group.
    """
    if ranks.rank != owner:
        for gram in grams:
            with _collective(ranks, f"sending the Hessian partials of {what} to its owner, rank {owner}"):
                dist.send(gram.to(ranks.comm_device).contiguous(), dst=owner)
        return None
    total = GramSum(in_features, ranks.device)
    buffer = torch.empty(in_features, in_features, device=ranks.comm_device)
    for source in range(ranks.world):
        if source == ranks.rank:
            for gram in grams:
                total.add(gram)
            continue
        for _ in range(int(counts[source, 0])):
            with _collective(ranks, f"receiving the Hessian partials of {what} from rank {source}"):
                dist.recv(buffer, src=source)
            total.add(buffer.to(ranks.device))
    return total.hessian(int(counts[:, 1].sum()))


def _broadcast_unit(ranks: Ranks, owner: int, solved: list[SolveResult] | None, what: str) -> list[SolveResult]:
    """The owner's results of one unit on every rank: the metadata as an object, then each factor as a tensor.

    Non-owners get contiguous fp32 copies of the factors (bit-identical values) and no masks.
    """
    meta = [None if solved is None else [
        (r.kind, {k: tuple(v.shape) for k, v in r.factors.items()}, r.nnz, r.error, r.relative_error, r.seconds)
        for r in solved
    ]]
    with _collective(ranks, f"receiving the factors of {what} from their owner, rank {owner}"):
        dist.broadcast_object_list(meta, src=owner, device=ranks.comm_device)
    results = []
    for index, (kind, shapes, nnz, error, relative_error, seconds) in enumerate(meta[0]):
        factors = {}
        for key, shape in shapes.items():
            if solved is not None:
                tensor = solved[index].factors[key].to(ranks.comm_device, torch.float32).contiguous()
            else:
                tensor = torch.empty(shape, device=ranks.comm_device)
            with _collective(ranks, f"receiving the factors of {what} from their owner, rank {owner}"):
                dist.broadcast(tensor, src=owner)
            factors[key] = tensor
        results.append(solved[index] if solved is not None else
                       SolveResult(kind, factors, nnz, error, relative_error, seconds))
    return results


def _solve_stage(
    ranks: Ranks,
    solver_config: SolverConfig,
    block: nn.Module,
    groups: list[Group],
    inputs: BlockInputs,
    what: str,
    report: Callable[[str, SolveResult], None],
) -> dict[str, SolveResult]:
    """Hessians of ``groups`` from every rank's shard, their units solved by their owners, the factors written
    back on every rank. Returns the results by layer name, in the groups' order."""
    grams: list[list[torch.Tensor]] = [[] for _ in groups]
    samples = [0] * len(groups)

    def sink(position: int, gram: torch.Tensor, count: int) -> None:
        grams[position].append(gram)
        samples[position] += count

    collect_grams(block, groups, inputs, ranks.device, sink)
    counts = _gather_counts(ranks, grams, samples, what)
    units = solve_units(groups)
    owners = assign_owners([unit.cost for unit in units], ranks.world)
    hessians: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for position, group in enumerate(groups):
            for owner in sorted({o for unit, o in zip(units, owners) if unit.group == position}):
                hessian = _reduce_to_owner(ranks, owner, grams[position], counts[:, position], group[0][1].in_features,
                                           f"{group[0][0]} ({what})")
                if hessian is not None:
                    hessians[position] = hessian
        grams.clear()  # the partials are no longer needed
        solved = {
            i: solve_group([linear.weight.detach().float() for _, linear in unit.members], hessians[unit.group],
                           solver_config, layer_names=[name for name, _ in unit.members])
            for i, (unit, owner) in enumerate(zip(units, owners)) if owner == ranks.rank
        }
        hessians.clear()
        results: dict[str, SolveResult] = {}
        for i, (unit, owner) in enumerate(zip(units, owners)):
            for (name, linear), result in zip(unit.members, _broadcast_unit(ranks, owner, solved.get(i),
                                                                            unit.members[0][0])):
                write_back(linear, result.kind, result.factors)
                results[name] = result
                report(name, result)
    return {name: results[name] for group in groups for name, _ in group}


def solve_block(
    ranks: Ranks,
    solver_config: SolverConfig,
    true_sequential: bool,
    index: int,
    block: nn.Module,
    groups: list[Group],
    inputs: BlockInputs,
    report: Callable[[str, SolveResult], None],
) -> dict[str, SolveResult]:
    """``compress.calibration.BlockSolver`` across the ranks (``inputs``: this rank's shard): all groups in one
    stage, or with ``true_sequential`` one stage per group."""
    stages = [[group] for group in groups] if true_sequential else [groups]
    results: dict[str, SolveResult] = {}
    for stage in stages:
        results.update(_solve_stage(ranks, solver_config, block, stage, inputs, f"block {index}", report))
    return results


# -------------------------------------------------------------------------------------------------- the run


def _prepare(ranks: Ranks, output: Path, fingerprint: Mapping[str, Any], *, resume: bool,
             overwrite: bool) -> tuple[PartialRun, set[int]]:
    """Rank 0 prepares the output (``compress.output.prepare_output``); every rank gets the partial state and the
    set of finished blocks, or rank 0's error (raised on every rank: the same type when it is a ``FileExistsError``,
    else ``OSError`` or ``ValueError``, with its message)."""
    outcome: list[Any] = [None]
    failure: OSError | ValueError | None = None
    if ranks.rank == 0:
        try:
            outcome = [(None, None, prepare_output(output, fingerprint, resume=resume,
                                                   overwrite=overwrite).finished_blocks())]
        except (OSError, ValueError) as exc:
            failure = exc
            kind = FileExistsError if isinstance(exc, FileExistsError) else OSError if isinstance(exc, OSError) \
                else ValueError
            outcome = [(kind, str(exc), [])]
    with _collective(ranks, "receiving the output's state from rank 0"):
        dist.broadcast_object_list(outcome, src=0, device=ranks.comm_device)
    kind, message, finished = outcome[0]
    if failure is not None:
        raise failure
    if kind is not None:
        raise kind(message)
    return PartialRun(output), set(finished)


@contextmanager
def _quiet_unless(enabled: bool) -> Iterator[None]:
    """Log below WARNING from ``compress`` only when ``enabled`` (rank 0 logs the run once)."""
    package = logging.getLogger("compress")
    level = package.level
    if not enabled:
        package.setLevel(logging.WARNING)
    try:
        yield
    finally:
        package.setLevel(level)


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
    """``compress.api.compress_model`` as one rank of a torchrun launch (``RANK``, ``WORLD_SIZE``, env://).

    Same arguments and output; the factors equal those of one process (see the module's docstring).

    Returns:
        On rank 0 the content of ``compression_report.json``; None on the other ranks (which return once the last
        block is compressed, while rank 0 writes the output).

    Raises:
        ConfigError: naming ``batch_size`` when there are fewer calibration chunks than ranks.
        PeerFailure: a collective failed (a peer rank died or stalled).
        The errors of ``compress.api.compress_model`` (rank 0's output errors are raised on every rank).
    """
    start = time.perf_counter()
    solver_config = config.solver_config()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if config.values != "float":
        raise ConfigError("values", f"{config.values} values are quantized in one process only; run without --nproc")
    chunks = -(-config.samples // config.batch_size)
    if chunks < world:
        raise ConfigError("batch_size", f"{config.samples} samples in chunks of {config.batch_size} make {chunks} "
                          f"chunk(s), fewer than the {world} ranks; lower the batch size or the number of ranks")
    ranks = _start(config.device)
    with _quiet_unless(rank == 0):
        inputs = read_inputs(config, model, tokenizer, "compress_model")
        spec = architecture_for(inputs.model_config)
        partial, finished = _prepare(ranks, Path(output), inputs.fingerprint(config, ranks.device),
                                     resume=resume, overwrite=overwrite)
        model = inputs.load_model(config, model)
        mine = chunk_range(chunks, world, rank)
        compress_blocks(
            model,
            spec,
            inputs.windows[mine.start * config.batch_size:mine.stop * config.batch_size],
            solver_config,
            device=ranks.device,
            offload=config.offload,
            batch_size=config.batch_size,
            true_sequential=config.true_sequential,
            dense_inputs=config.pipeline == "dense-inputs",
            finished=lambda index, linears: partial.load_block(index, linears) if index in finished else None,
            on_block=partial.save_block if rank == 0 else lambda index, results: None,
            progress=progress and rank == 0,
            solve_block=lambda *args: solve_block(ranks, solver_config, config.true_sequential, *args),
        )
        report = None
        if rank == 0:
            info = run_info(config, ranks.device, model, inputs, start)
            report = write_output(Path(output), model, inputs.tokenizer, spec, partial, info, inputs.source)
    if ranks.joined:
        dist.destroy_process_group()
    return report
