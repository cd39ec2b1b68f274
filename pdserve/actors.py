"""The prefill and decode workers as restartable Ray actors.

Each is created with ``max_restarts``: when its process dies, Ray starts it again with the same
constructor arguments, and a constructor that finds itself reconstructed loads the model again
(``start``), so the worker comes back by itself; the supervisor (``pdserve.supervisor``) sees the
new incarnation answer its pings and puts it back into placement. ``ping`` runs in its own
concurrency group, so a long prefill does not make a live worker look dead.
"""
from __future__ import annotations

import dataclasses
import os
import uuid

import ray

from decode.worker import DecodeWorker
from kvstore.handoff import WorkerInfo
from model.config import QuantConfig
from model.engine import EngineConfig
from model.loader import load
from prefill.worker import PrefillWorker

HEALTH_GROUP = {"health": 1}  # the concurrency group pings run in


class ResourceError(ValueError):
    """The workers ask for GPUs or a device the cluster does not have."""


def worker_device(device: str, gpu_ids: tuple[str, ...]) -> str:
    """The torch device of a worker, decided inside its Ray process (Ray sets CUDA_VISIBLE_DEVICES
    to the GPUs it assigned, so "cuda" is the worker's first one). ``auto`` means cuda where the
    worker holds a GPU share and torch sees CUDA; asking for cuda where torch sees none is a
    configuration error, reported as one rather than as torch's traceback from the first tensor."""
    if device == "cpu" or (device == "auto" and not gpu_ids):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "auto":
        return "cpu"
    raise ResourceError(f"config key cluster.device = 'cuda', but torch {torch.__version__} sees no CUDA device "
                        f"on node {os.uname().nodename} (Ray assigned GPU ids {list(gpu_ids)}, CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); use device = 'auto' or 'cpu' there")


class _RayWorker:
    """What the prefill and decode actors share: loading on their device, reporting their GPUs,
    answering pings, coming back after a restart.

    The work of construction happens in ``start``, a method, because Ray hands the driver only the
    text (with its traceback) of an exception raised in an actor's constructor, while a method's
    exception arrives as itself: a ResourceError stays one. A reconstructed actor (Ray restarted
    it) calls ``start`` itself, with the arguments it was created with."""

    def __init__(self, *start_args, **start_kwargs) -> None:
        self.incarnation = uuid.uuid4().hex[:12]
        self.ready = False
        if start_args and ray.get_runtime_context().was_current_actor_reconstructed:
            self.start(*start_args, **start_kwargs)

    def start(self, name: str, model_name: str, quant: QuantConfig | None, store, fingerprint: int,
              engine_config: EngineConfig, device: str, **worker_options) -> WorkerInfo:
        """Loads the model on this worker's device, chosen here because only this process sees the
        GPUs Ray assigned it; returns the worker's info for the handshake."""
        self.gpu_ids = tuple(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
        loaded = load(model_name, quant=quant, device=worker_device(device, self.gpu_ids))
        super().__init__(name, loaded.model, store, fingerprint, engine_config, loaded.tokenizer, **worker_options)
        self.ready = True
        return self.info()

    def info(self) -> WorkerInfo:
        """The worker's info with the GPU ids that only Ray knows."""
        return dataclasses.replace(super().info(), gpu_ids=self.gpu_ids)

    @ray.method(concurrency_group="health")
    def ping(self) -> dict:
        """Liveness and load for the supervisor; ``incarnation`` changes when Ray restarts the actor."""
        if not self.ready:
            return {"ready": False, "incarnation": self.incarnation}
        return {"ready": True, "incarnation": self.incarnation, "info": self.info(), **self.load()}

    def pid(self) -> int:
        """The actor's process id (tests kill it the way an operator's kill -9 would)."""
        return os.getpid()


class PrefillActor(_RayWorker, PrefillWorker):
    """A prefill worker in its own Ray process (threaded: concurrent calls are prefilled together)."""


class DecodeActor(_RayWorker, DecodeWorker):
    """A decode worker in its own Ray process (threaded: streams are read while it decodes)."""


def spawn(cls, name: str, start_args: tuple, worker_options: dict, **options):
    """A restartable actor of ``cls`` that reloads itself from ``start_args`` when Ray restarts it."""
    return (ray.remote(concurrency_groups=HEALTH_GROUP)(cls).options(max_restarts=-1, max_task_retries=0, **options)
            .remote(name, *start_args, **worker_options))
