"""Past one device: every stage under ``torchrun``, with DistributedDataParallel (DDP).

``torchrun --nproc_per_node=N -m regdiff_core <stage> --profile P`` starts N processes (*ranks*); the CLI
calls :func:`init_from_env` once, which joins them into one process group (``nccl`` on GPUs, one GPU per
rank, ``gloo`` on CPUs) and returns this rank's device. Without ``torchrun`` — or with one process —
nothing here does anything: every helper is then the identity or a no-op, so a chapter's code reads the
same either way. The conventions are MONAI's tutorials' (``init_process_group``, DDP, a share of the data
per rank, rank 0 alone writing files):

- **Training** (chapters 2, 3, 5): the profile's ``batch_size`` is the *global* batch.
  :func:`rank_batch` gives each rank its share (and says so when it does not divide) and gives each rank
  its own random stream derived from the seed (:func:`seed_rank_stream`); :func:`wrap` puts the network in
  DDP, whose gradient hook weights rank r's gradient by its share b_r / B, so that the averaged gradient is
  the full batch's mean gradient and the learning rates and schedules of the one-device run apply
  unchanged. :func:`regdiff_core.training.train_loop` averages the logged numbers over the ranks, keeps
  every rank's RNG state in the checkpoint and resumes each rank from its own; rank 0 alone writes files
  (:func:`regdiff_core.utils.atomic_torch_save` is a no-op on the other ranks, whose state is the same).
- **Sampling and evaluation** (chapters 4, 6): the batches of pairs and the test pairs are split over the
  ranks (:func:`shard`); :func:`gather` collects every rank's result (or every rank's error) on all ranks,
  so that the set of pairs is published, and the metrics written, only when every rank has finished.

Left out on purpose: ``SyncBatchNorm`` (the networks use instance and layer norm, which need no
statistics across ranks); gradient accumulation (the global batch is the profile's); a ``DistributedSampler``
(the stages draw random batches with replacement across steps, not epochs, so a sampler's partition of an
epoch does not apply); and ``torch.compile`` (as everywhere in this package). A work folder shared by all
nodes is assumed (the usual cluster file system): a rank that cannot see the checkpoint or the other
ranks' files stops with an error saying so.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")

#: The stages that run on several processes; the others (``prepare``, ``encode``, ``gpu-check``) refuse.
STAGES = ("train-vqae", "train-diffusion", "train-registration", "sample", "evaluate")


class Context(NamedTuple):
    """``rank`` of ``world_size`` processes; ``local_rank``: the rank on this node (its GPU index)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def context() -> Context:
    """This process's place in the process group; ``Context(0, 1, 0)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return Context(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
    return Context(0, 1, 0)


def is_main() -> bool:
    """True on rank 0 and in a run without ``torchrun``: the process that writes files and prints."""
    return context().is_main


def launched() -> bool:
    """Started by ``torchrun`` (or another launcher setting ``WORLD_SIZE``) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto", stage: str | None = None) -> str:
    """Join the process group ``torchrun`` describes (``env://``) and return this rank's device string.

    ``device``: ``auto`` → ``cuda:<LOCAL_RANK>`` with ``nccl`` when CUDA is there, else ``cpu`` with
    ``gloo``; ``cuda`` → ``cuda:<LOCAL_RANK>``; ``cpu`` → ``gloo`` even on a GPU node. A device with an
    index is refused (``CUDA_VISIBLE_DEVICES`` chooses the GPUs). Ranks other than 0 print nothing on
    standard output. Without ``torchrun`` (or with one process) returns ``device`` unchanged.
    """
    from regdiff_core.config import ConfigError
    from regdiff_core.utils import DeviceError

    if not launched():
        return device
    if stage is not None and stage not in STAGES:
        raise ConfigError(
            f"stage {stage!r} runs on one process: start it without torchrun (the stages that run on "
            f"several are {', '.join(STAGES)})"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device)
    if kind.type == "cuda":
        if kind.index is not None:
            raise DeviceError(
                f"--device {device} under torchrun: each rank takes cuda:<LOCAL_RANK>; choose the GPUs "
                "with CUDA_VISIBLE_DEVICES and pass --device cuda (or auto)"
            )
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise DeviceError(
                f"rank with LOCAL_RANK={local_rank} has no GPU (this node has {torch.cuda.device_count()}): "
                "start at most that many processes per node (--nproc_per_node), or use --device cpu"
            )
        out = torch.device("cuda", local_rank)
        torch.cuda.set_device(out)
        backend = "nccl"
    elif kind.type == "cpu":
        out, backend = torch.device("cpu"), "gloo"
    else:
        raise DeviceError(f"--device {device}: torchrun runs on CUDA GPUs (nccl) or CPUs (gloo) only")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # the run's report once, from rank 0, not N times
    return str(out)


def shutdown() -> None:
    """Leave the process group (the end of a ``torchrun`` stage). No barrier: rank 0 may still be writing
    its report (``train-vqae`` reconstructs the test pairs alone) long after the others are done."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Collectives that are no-ops in one process
# --------------------------------------------------------------------------------------------------


def _comm_device() -> torch.device:
    """Where tensors for a collective live: the rank's GPU with nccl, the CPU with gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if context().active:
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (any device: copied to the backend's and back)."""
    if not context().active:
        return tensor
    buf = tensor.to(_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s, in place."""
    if not context().active:
        return tensor
    buf = tensor.to(_comm_device())
    dist.broadcast(buf, src=src)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in one process."""
    ctx = context()
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not context().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_ranks(row: dict[str, float], skip: Sequence[str] = ("step",)) -> dict[str, float]:
    """The mean of every number of ``row`` over the ranks (one all-reduce); keys in ``skip`` are kept."""
    ctx = context()
    if not ctx.active:
        return row
    keys = [k for k in row if k not in skip]
    values = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    mean = (values / ctx.world_size).tolist()
    return {k: (mean[keys.index(k)] if k in keys else v) for k, v in row.items()}


class RankError(RuntimeError):
    """Another rank failed; the message names it and its error (which that rank printed in full)."""


def gather(fn: Callable[[], T]) -> list[T]:
    """Run ``fn`` on every rank and return every rank's result, in rank order, on every rank.

    When ``fn`` raises on any rank, every rank raises: that rank its own error, the others a
    :class:`RankError` naming it — so no rank publishes a result that is not complete, and none waits
    forever for one that failed.
    """
    try:
        result, failure = fn(), None
    except Exception as err:
        result, failure = None, err
    if not context().active:
        if failure is not None:
            raise failure
        return [result]
    note = None if failure is None else f"{type(failure).__name__}: {failure}"
    gathered = all_gather_objects((note, result))
    if failure is not None:
        raise failure
    failed = [(r, n) for r, (n, _) in enumerate(gathered) if n is not None]
    if failed:
        rank, note = failed[0]
        raise RankError(f"rank {rank} of {len(gathered)} failed ({note}); nothing was published")
    return [r for _, r in gathered]


# --------------------------------------------------------------------------------------------------
# Training: the batch share, the random streams, the DDP wrapper
# --------------------------------------------------------------------------------------------------


def batch_shares(global_batch: int, world_size: int) -> list[int]:
    """The samples of a ``global_batch`` each rank takes: as equal as possible, the first ranks one more."""
    base, extra = divmod(int(global_batch), int(world_size))
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def rank_batch(global_batch: int, what: str = "batch_size") -> int:
    """This rank's share of the profile's (global) batch; the batch itself in one process.

    Also starts this rank's own random stream (:func:`seed_rank_stream`), from which it draws its share.
    When the batch does not divide, rank 0 prints what each rank takes; :func:`wrap` then weights each
    rank's gradient by its share, so the step is still the full batch's. A batch smaller than the number
    of ranks is refused (a rank with nothing to train on cannot take part in DDP's gradient average).
    """
    from regdiff_core.config import ConfigError

    ctx = context()
    if not ctx.active:
        return int(global_batch)
    shares = batch_shares(global_batch, ctx.world_size)
    if shares[-1] == 0:
        raise ConfigError(
            f"{what}={global_batch} is smaller than the {ctx.world_size} processes: every rank needs at least "
            f"one sample; start at most {global_batch} processes or raise {what}"
        )
    if len(set(shares)) > 1 and ctx.is_main:
        print(
            f"[distributed] {what}={global_batch} does not divide over {ctx.world_size} ranks: they take "
            f"{', '.join(map(str, shares))} samples; gradients are weighted by share, so each step is the "
            "full batch's mean gradient"
        )
    seed_rank_stream()
    return shares[ctx.rank]


def seed_rank_stream() -> int:
    """Give this rank its own random stream (torch, NumPy, Python), derived from the current one.

    Every rank has been seeded alike (the stage's ``--seed``), so all draw the same ``base``; the stream
    seed is then a hash of (``base``, rank), different per rank and the same in every repeat of the run.
    Returns the stream seed (``-1`` and nothing changed in one process).
    """
    from regdiff_core.utils import seed_everything

    ctx = context()
    if not ctx.active:
        return -1
    base = int(torch.randint(0, 2**62, (1,)))
    seed = int(np.random.SeedSequence([base, ctx.rank]).generate_state(1, np.uint64)[0] % 2**62)
    seed_everything(seed)
    return seed


def global_denominator(local: torch.Tensor, local_batch: int, global_batch: int) -> torch.Tensor:
    """The denominator that makes a rank's weighted mean Σw·l / Σw a share of the global batch's.

    Under DDP with gradients weighted by b_r / B (:func:`wrap`), rank r's loss S_r / D_r contributes
    (b_r / B) · S_r / D_r; with D_r = (Σ_ranks Σw) · b_r / B the sum over ranks is Σ S / Σ w, the full
    batch's weighted mean. ``local``: this rank's Σw (no gradient). One process: ``local``.
    """
    if not context().active:
        return local
    total = all_reduce_sum_(local.detach().clone())
    return total * (local_batch / global_batch)


def _share_weighted_allreduce(weight, bucket):  # no annotations: DDP checks them against its own types
    """DDP communication hook: g = Σ_r w_r · g_r with w_r = b_r / B (the default hook's w_r is 1/N)."""
    buf = bucket.buffer().mul_(weight)
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap(module: torch.nn.Module, global_batch: int | None = None) -> torch.nn.Module:
    """``module`` in DistributedDataParallel (one process: ``module`` itself).

    Call the wrapper for the forward pass of a training step; keep ``module`` for everything else
    (checkpoints, EMA, saving): it holds the same parameters, without DDP's ``module.`` prefix.
    Buffers are not broadcast from rank 0 at each forward (the VQ-AE's usage counts are summed over
    the ranks instead). With ``global_batch``, rank r's gradient is weighted by b_r / B before the sum.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ctx = context()
    if not ctx.active:
        return module
    device = next(module.parameters()).device
    # no buffer broadcast at each forward (torch >= 2.13 names it forward_sync_buffers)
    buffers = {"forward_sync_buffers": False}
    if "forward_sync_buffers" not in inspect.signature(DistributedDataParallel).parameters:
        buffers = {"broadcast_buffers": False}
    ddp = DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, **buffers
    )
    shares = batch_shares(global_batch, ctx.world_size) if global_batch else [1] * ctx.world_size
    ddp.register_comm_hook(shares[ctx.rank] / sum(shares), _share_weighted_allreduce)
    return ddp


def wrap_each(modules: torch.nn.ModuleList, global_batch: int | None = None) -> Callable[[], None]:
    """Put every module of ``modules`` in its own DDP wrapper, in place (one per optimizer, as the
    registration's two greedily trained networks); returns the function that puts the plain ones back."""
    plain = list(modules)
    if context().active:
        for i, m in enumerate(plain):
            modules[i] = wrap(m, global_batch)

    def unwrap() -> None:
        for i, m in enumerate(plain):
            modules[i] = m

    return unwrap


# --------------------------------------------------------------------------------------------------
# Sampling and evaluation: a share of the items per rank
# --------------------------------------------------------------------------------------------------


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items: every ``world_size``-th, starting at its rank (all items in one process)."""
    ctx = context()
    return list(items)[ctx.rank :: ctx.world_size]


def take(record: T, index: Sequence[int]) -> T:
    """A dataclass of per-case fields (``PairSet``, ``Landmarks``) restricted to the cases ``index``:
    lists are picked, tensors indexed along their first axis, anything else kept."""
    n = len(record.cases)  # type: ignore[attr-defined]
    changes = {}
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        value = getattr(record, f.name)
        if isinstance(value, list) and len(value) == n:
            changes[f.name] = [value[i] for i in index]
        elif torch.is_tensor(value) and value.dim() > 0 and len(value) == n:
            changes[f.name] = value[list(index)]
    return dataclasses.replace(record, **changes)


def evaluate_split(evaluate: Callable[[Any, Any], Any], test: Any, landmarks: Any) -> Any:
    """``evaluate(test, landmarks)`` (→ a :class:`regdiff_core.metrics.Evaluation`) with the test pairs
    dealt to the ranks: each evaluates its share, and every rank gets back the whole evaluation, its cases
    in the order of ``test`` (``seconds``: the slowest rank's). One process: ``evaluate(test, landmarks)``."""
    index = shard(range(len(test)))
    parts = gather(lambda: evaluate(take(test, index), take(landmarks, index)))
    if len(parts) == 1:
        return parts[0]
    by_case = {row.case: row for part in parts for row in part.cases}
    merged = parts[0]
    merged.cases = [by_case[c] for c in test.cases]
    merged.seconds = max(part.seconds for part in parts)
    return merged
