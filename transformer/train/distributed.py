"""Multi-host start-up (`jax.distributed.initialize` when more than one process runs), and the two
helpers every process-symmetric loop needs: host rows → global arrays, and a flag any process raised."""

from __future__ import annotations

import logging
import os
import socket

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

# Environment variables that mean "this process is one of several" for jax's auto-detection.
_CLUSTER_HINTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
# The environment's equivalent of config.distributed.{coordinator_address,num_processes,process_id}.
_ENV_SETTINGS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _detected_processes() -> int:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ["SLURM_NTASKS"])
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return int(os.environ["OMPI_COMM_WORLD_SIZE"])
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return max(len(hosts), 1)


def initialize(config: ml_collections.ConfigDict) -> None:
    """A no-op on one process. With `config.distributed.coordinator_address` set (or else
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID), joins that coordinator as
    `process_id` of `num_processes`; on a detected cluster (SLURM, Open MPI, a multi-host TPU
    VM), or with `num_processes` > 1 and no address, lets jax find its peers."""
    cfg = config.distributed
    address, count, index = cfg.coordinator_address, cfg.num_processes, cfg.process_id
    if not address and all(os.environ.get(k) for k in _ENV_SETTINGS):  # Set by a launcher.
        address, count, index = (os.environ[k] for k in _ENV_SETTINGS)
    if address:
        _check_reachable(address, int(index), cfg.initialization_timeout)
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(count),
            process_id=int(index),
            initialization_timeout=cfg.initialization_timeout,
        )
    elif _detected_processes() > 1 or cfg.num_processes > 1:  # E.g. a TPU VM pod (metadata).
        jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)
    else:
        return
    logging.info(
        "process %d of %d; %d local / %d global devices", jax.process_index(),
        jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def _check_reachable(address: str, process_id: int, timeout: int) -> None:
    """Give a Python error instead of the runtime's abort when the coordinator never answers.
    Process 0 hosts the coordinator, so only the others check."""
    if process_id == 0:
        return
    host, _, port = address.rpartition(":")
    deadline_error = None
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as error:
            deadline_error = error
            time.sleep(0.5)
    raise ConnectionError(
        f"coordinator {address} not reachable after {timeout}s ({deadline_error}); start process 0 "
        "first and check config.distributed.coordinator_address"
    )


def to_global(batch: dict[str, np.ndarray], batch_sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows → one global array per feature, sharded over the batch axis."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
        for k, v in batch.items()
    }


def any_process_has(value: bool) -> bool:
    if jax.process_count() == 1:
        return value
    return bool(np.any(multihost_utils.process_allgather(np.array(value))))
