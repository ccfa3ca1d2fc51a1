"""Extraction on many GPUs or machines with dask.distributed: a task per shard, a model per worker.

The client plans the job (index, artifacts, pending shards) and holds the cache lock; every pending
shard becomes one task, keyed `lare-shard-<job>-<run>-<shard>`, which computes and writes that whole
shard and its progress record. The run token is in the key because the fingerprint does not name the
cache: a long-lived scheduler must never answer a run on one cache with a result kept from another.

A `WorkerPlugin` carries the job to every worker, including workers that join (or are restarted)
later, and keeps the worker's model: it is loaded by the worker's first task, not in `setup` (which
runs on the worker's event loop and would stall its heartbeats for the minutes a large model takes),
and reused by every later task. On a GPU, tasks ask
for `resources={"GPU": 1}`, so a worker started with `--resources GPU=1` (one per GPU) runs one at
a time. When a worker dies, dask reruns its tasks elsewhere; since a shard's record is written after
its data and values depend only on the row (never on which worker or in which order), the cache ends
bitwise the same as a single-process run with the same thread count.

Layering: extract's dask backend, beside extract (a command module): the job and the per-shard
computation are stages.extract, imported inside the functions, as the CLI imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

from distributed import Client, Nanny, Scheduler, SpecCluster, as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.config import loader_workers
from pipeline.errors import UserError
from pipeline.fingerprint import fingerprint
from pipeline.runner import ShardWriteError

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr

if TYPE_CHECKING:
    from stages.extract import ExtractJob, ShardComputer

CONNECT_TIMEOUT_S = 10


def job_id(job: ExtractJob) -> str:
    """A short name for a job: its artifacts' fingerprints decide it."""
    return fingerprint(sorted(a.fingerprint for a in job.artifacts.values()))[:12]


def check_worker(job: ExtractJob) -> None:
    """Refuse to compute a job whose artifacts this worker's own code or model files would not produce.

    A cluster whose workers run another version of the package would otherwise write values that
    do not match the fingerprint they are stored under.
    """
    from stages import extract
    from stages.features import sd

    here = platform.node()
    ours = extract.lare_artifact(job.cfg, job.artifacts["lare"].attrs["upstream"]["index"], job.model,
                                 job.precision, job.latent)  # fmt: skip
    if ours.fingerprint != job.artifacts["lare"].fingerprint:
        raise UserError(
            f"worker on {here} runs other code than the client (code version {ours.attrs['code_version']}, "
            f"the job's {job.artifacts['lare'].attrs['code_version']}): install the same version everywhere"
        )
    if "pixels" in job.artifacts:
        pixels = extract.pixel_artifact(job.cfg, job.artifacts["pixels"].attrs["upstream"]["index"])
        if pixels.fingerprint != job.artifacts["pixels"].fingerprint:
            raise UserError(f"worker on {here} runs other pixel code than the client: install one version")
    if job.needs_lare:
        weights = sd.resolve_model(job.cfg.model).weights
        if weights != job.model.weights:
            raise UserError(
                f"worker on {here} sees other weights for model '{job.cfg.model}' "
                f"({weights[:12]}, the client's {job.model.weights[:12]})"
            )


class ExtractPlugin(WorkerPlugin):
    """Carries one job to a worker and keeps the worker's ShardComputer (its model) for every task."""

    idempotent = False

    def __init__(self, job: ExtractJob):
        self.job = job
        self.run = uuid.uuid4().hex[:8]  # two runs with equal parameters on one cluster stay apart
        self.name = f"lare-extract-{job_id(job)}-{self.run}"
        self.loads = 0  # how many times this worker built a model for the job (1 is the point)
        self._computer: ShardComputer | None = None
        self._lock: threading.Lock | None = None

    def setup(self, worker) -> None:
        self._lock = threading.Lock()

    def teardown(self, worker) -> None:
        self._computer = None

    def computer(self) -> ShardComputer:
        from stages.extract import ShardComputer

        assert self._lock is not None  # made in setup, before any task
        with self._lock:
            if self._computer is None:
                check_worker(self.job)
                self._computer = ShardComputer(self.job)
                self.loads += 1
            return self._computer


def compute_shard(plugin_name: str, shard: int) -> dict[str, Any]:
    """The task: compute and write one whole shard on this worker; returns what the client reports."""
    worker = get_worker()
    plugin = cast(ExtractPlugin, worker.plugins[plugin_name])  # registered under this name (run_on_cluster)
    try:
        failed = plugin.computer().run([shard])
    except ShardWriteError as e:  # the storage's fault: reported, not raised (no worker traceback in logs)
        return {"shard": shard, "storage_fault": e.error}
    start, stop = plugin.job.plan.bounds(shard)
    return {"shard": shard, "rows": stop - start, "failed": failed, "worker": worker.address,
            "pid": os.getpid(), "loads": plugin.loads}  # fmt: skip


def gpu_cluster_spec(devices: list[str]) -> dict[str, dict[str, Any]]:
    """One worker per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES), offering the GPU resource."""
    return {
        f"gpu-{dev}": {
            "cls": Nanny,
            "options": {"nthreads": 1, "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": dev}},
        }
        for dev in devices
    }


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def connect(device: str, workers: int | None, scheduler: str | None) -> Iterator[Client]:
    """A client of an existing scheduler, or of a cluster of `workers` started on this machine for the run."""
    if device.startswith("cuda:"):  # a worker seeing one GPU has no cuda:1; workers seeing all would share it
        raise UserError(f"on a dask cluster pass --device cuda, not {device}: each worker takes one GPU")
    if scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
        except ValueError as e:  # not an address: no port, an unknown scheme
            raise UserError(f"--scheduler {scheduler}: {e}; give an address like tcp://host:8786") from None
        except (OSError, TimeoutError) as e:
            raise UserError(
                f"cannot reach the dask scheduler at {scheduler} within {CONNECT_TIMEOUT_S} s ({e})"
            ) from None
        with client:
            yield client
        return
    import dask

    # DataLoader decode workers are child processes: dask's default daemonic workers may not have any.
    with dask.config.set({"distributed.worker.daemon": False}):
        if device == "cuda":
            gpus = visible_gpus()
            if workers is not None and workers > len(gpus):
                raise UserError(f"--workers {workers} with --device cuda, but {len(gpus)} GPU(s) visible")
            cluster = SpecCluster(
                workers=gpu_cluster_spec(gpus[:workers]),
                scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
                silence_logs=logging.ERROR,
            )
        else:
            from distributed import LocalCluster

            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.ERROR,
            )  # fmt: skip
        with cluster, Client(cluster) as client:
            logger.info(f"dask: {workers} local worker(s), scheduler {cluster.scheduler_address}")
            yield client


def run_on_cluster(
    client: Client, job: ExtractJob, shards: list[int], on_rows: Callable[[int], None] = lambda n: None
) -> list[dict[str, Any]]:
    """Submit one task per shard and wait for them all; returns each task's report (compute_shard)."""
    resources = {"GPU": 1} if job.device.startswith("cuda") else None
    info = client.scheduler_info(n_workers=-1)["workers"]
    if resources and info and not any(w.get("resources", {}).get("GPU") for w in info.values()):
        raise UserError(
            # a connected client has its scheduler (distributed types it as optional)
            f"no worker of the cluster at {client.scheduler.address} offers the GPU resource: "  # type: ignore[union-attr]
            "start one worker per GPU with `--resources GPU=1`"
        )
    plugin = ExtractPlugin(job)
    client.register_plugin(plugin, name=plugin.name)
    jid = job_id(job)
    try:
        futures = [
            client.submit(
                compute_shard,
                plugin.name,
                s,
                key=f"lare-shard-{jid}-{plugin.run}-{s}",
                resources=resources,
            )
            for s in shards
        ]
        reports = []
        for future in as_completed(futures):
            reports.append(future.result())
            if "storage_fault" in reports[-1]:
                raise ShardWriteError(reports[-1]["storage_fault"])
            on_rows(reports[-1]["rows"])
        return reports
    finally:
        client.unregister_worker_plugin(plugin.name)


def cluster_compute(workers: int | None, scheduler: str | None):
    """The `compute` of stages.extract.run_extract for --workers N (local cluster) or --scheduler ADDRESS."""
    if workers is not None and scheduler:
        raise UserError("--workers and --scheduler exclude each other: --workers starts a cluster here")
    if workers is not None and workers < 1:
        raise UserError("--workers must be positive")

    def compute(job: ExtractJob, shards: list[int], on_rows: Callable[[int], None]) -> int:
        if workers and job.cfg.loader_workers < 0:  # the local GPUs share this host's decode cores
            from stages.configs import DECODE_WORKERS

            auto = loader_workers(-1, job.device, DECODE_WORKERS, gpus=workers)
            cfg = dataclasses.replace(job.cfg, loader_workers=auto)
            job = dataclasses.replace(job, cfg=cfg)
        with connect(job.device, workers, scheduler) as client:
            return sum(r["failed"] for r in run_on_cluster(client, job, shards, on_rows))

    return compute
