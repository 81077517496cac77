"""Data-parallel statistics over torch.distributed: `torchrun --nproc-per-node N -m exporter export ...`.

torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT) starts N copies of the export.
Each loads the model and reads the same calibration windows (rank 0 makes them and sends them to the others);
every statistic that is a sum over calibration sequences (the Grams, the head's Gram, the Fisher scores, the
output sensitivities) is computed by each rank on its shard of the windows, rank r taking windows r, r+N, ...,
and summed over the ranks (all_reduce), so every rank holds the statistics one process computes, up to the order
of float additions. Per-weight work (each projection's whitened SVD, its GPTQ grid) is split over the ranks, every
N-th projection of a layer to each, and the results exchanged (all_gather). Choices made from the statistics
(ranks, formats) are then the same on every rank. The end-to-end KL training (corrective branches, scale tuning)
runs under DistributedDataParallel: every rank draws the same batch and trains on its share of it
(`batch_share`), the gradients averaged over the ranks in the backward pass. Rank 0 writes the artifact; the others stop after the
compression. Backends: gloo on CPUs, NCCL with `--compute cuda`
(each rank on cuda:LOCAL_RANK). Collectives time out (EXPORTER_COLLECTIVE_TIMEOUT seconds, default 1800), and a
rank whose peer stopped fails its next collective: every rank ends with a one-line error, none hangs.
"""

from __future__ import annotations

import datetime
import os

import torch

from exporter.errors import ExporterError

TIMEOUT_ENV = "EXPORTER_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800


class Stopped(ExporterError):
    """torchrun ended this rank because another one failed."""

    exit_code = 1


def stop_on_sigterm() -> None:
    """Under torchrun, the SIGTERM its agent sends when another rank fails becomes a one-line error here (its
    staging folder removed on the way out, as for any error)."""
    import signal

    def stopped(_signum, _frame):
        raise Stopped(f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}: stopped by "
                      "torchrun because another process failed (its error says why)")

    if launched():
        signal.signal(signal.SIGTERM, stopped)


def stopped_in(exc: BaseException) -> Stopped | None:
    """The Stopped that torchrun's SIGTERM raised, if `exc` was raised while handling it: the signal can arrive
    inside code that wraps whatever it raises (transformers' lazy imports re-raise it as ModuleNotFoundError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Stopped):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def launched() -> bool:
    """Started by torchrun (or a launcher like it) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def start(device: torch.device) -> None:
    """Join the process group the launcher described (no-op for one process)."""
    if not launched() or active():
        return
    if not torch.distributed.is_available():
        raise ExporterError("torchrun started several processes, but this torch has no torch.distributed")
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=timeout,
                                         device_id=device if device.type == "cuda" else None)


def stop() -> None:
    """Leave the group with the other ranks: a barrier (rank 0 reaches it once the artifact is written), then the
    group destroyed. A rank that destroyed its group while rank 0 still wrote sometimes aborted at exit
    ("terminate called without an active exception", gloo; once in the suite's torchrun test, 2026-12-05)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if active():
        try:
            torch.distributed.barrier()
        except Exception as exc:  # noqa: BLE001  (gloo raises RuntimeError and DistBackendError alike)
            raise ExporterError(f"rank {rank()} of {world_size()}: another process ended before finishing "
                                f"(its error says why; here: {type(exc).__name__})") from None
    torch.distributed.destroy_process_group()


def local_cuda_index() -> int | None:
    """The GPU of this rank on its node (torchrun's LOCAL_RANK), where launched with several processes."""
    return int(os.environ["LOCAL_RANK"]) if launched() and "LOCAL_RANK" in os.environ else None


def shard(input_ids: torch.Tensor) -> torch.Tensor:
    """This rank's calibration sequences: r, r + N, ... (all of them for one process)."""
    size = world_size()
    if size == 1:
        return input_ids
    if input_ids.shape[0] < size:
        raise ExporterError(f"{input_ids.shape[0]} calibration sequences for {size} processes: each process needs "
                            f"at least one (raise --calib-samples or --fisher-samples, or start fewer processes)")
    return input_ids[rank() :: size]


def sum_over_ranks(tensors) -> None:
    """Sum each tensor over the ranks, in place (each once, however often it is listed)."""
    if not active():
        return
    for tensor in {id(t): t for t in tensors}.values():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo, host ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


def split_work(keys: list) -> tuple[list, callable]:
    """(the keys this rank computes: every N-th, from its rank; a merge of each rank's {key: result} into every
    rank's, in `keys`' order). Per-weight work (a projection's SVD, its GPTQ grid) is done once, by one rank."""
    size = world_size()
    mine = keys if size == 1 else keys[rank() :: size]

    def merge(results: dict) -> dict:
        if size == 1:
            return results
        gathered = [None] * size
        torch.distributed.all_gather_object(gathered, results)
        merged = {k: v for part in gathered for k, v in part.items()}
        return {k: merged[k] for k in keys}

    return mine, merge


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """`module` wrapped in DistributedDataParallel where several processes train it (each rank runs its
    `batch_share` of every batch; the backward pass averages the gradients of its trainable parameters over the
    ranks, so every rank takes the same optimizer step), the module itself for one process. The ranks hold the same
    weights already (same model, same choices): no initial broadcast, and no buffers sent per step."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, init_sync=False, broadcast_buffers=False)


def batch_share(batch: torch.Tensor) -> torch.Tensor:
    """This rank's sequences of a training batch every rank drew alike (the same seeded generator): r, r + N, ...;
    the whole batch where it has fewer sequences than ranks (every rank then computes the same gradient). With
    equal shares, the averaged gradient of the per-rank means is the whole batch's mean gradient."""
    size = world_size()
    return batch[rank() :: size] if size > 1 and batch.shape[0] >= size else batch


def all_agree(flag: bool) -> bool:
    """True where every rank's flag is true (a decision every rank must take the same way)."""
    if not active():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def from_rank_zero(make):
    """make() on rank 0, its result sent to every rank (picklable: calibration ids and their description)."""
    if not active():
        return make()
    box = [make() if rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def describe() -> dict | None:
    """The manifest's record of a data-parallel run (None for one process)."""
    if not active():
        return None
    return {"world_size": world_size(), "backend": torch.distributed.get_backend(),
            "sharding": "calibration windows interleaved over ranks: rank r reads windows r, r+N, ...; sums "
                        "over windows (Grams, Fisher scores, output sensitivities) all-reduced; each projection's "
                        "SVD and GPTQ grid computed by one rank; end-to-end KL steps (corrective branches, scale "
                        "tuning) under DistributedDataParallel, each rank its share of every batch"}
