"""Connecting to Ray: an in-process local Ray by default, a cluster with `--address` / `RAY_ADDRESS`.

A local Ray started here is private to this machine: its node address is 127.0.0.1, so the GCS, the
raylet, the object manager, the runtime-env agent and every worker's gRPC server listen on the loopback
interface only, and its dashboard (not started at all unless asked) binds to 127.0.0.1. Nothing listens
on a public interface (tests/integration/test_ray_bind.py checks every listening socket of a real
session). Ray itself, left alone, turns 127.0.0.1 into the machine's routable address and listens on
all interfaces; what keeps it on loopback is Ray's single-machine switch, `LOOPBACK_ONLY` below.

Connecting to a cluster (`ray start` via `launch.sh ray-head` / `ray-worker`) changes nothing of Ray's
own security: its token authentication stays as Ray configures it, and the head's dashboard binds to
127.0.0.1 unless `RAY_DASHBOARD_HOST` says otherwise.
"""

from __future__ import annotations

import os
import sys
import threading

_INIT = threading.Lock()

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch between a cluster node (routable address, every interface) and a single machine
(loopback only), named for the platforms where Ray defaults to the latter; set to 0 for a local Ray.
Ray reads it into `ray._private.ray_constants.ENABLE_RAY_CLUSTER` when first imported;
tests/unit/pipeline/test_ray_pins.py checks both names against Ray's."""


def ensure_ray(address: str | None = None, dashboard: bool = False, num_cpus: int | None = None) -> None:
    """Initialise Ray once for this process: connect to `address` (or $RAY_ADDRESS) or start locally.

    Thread-safe: the pipeline's stages call it from their own threads.
    """
    with _INIT:
        _init(address, dashboard, num_cpus)


def _init(address: str | None, dashboard: bool, num_cpus: int | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        _loopback_only()
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
        runtime_env=None if dashboard else {"worker_process_setup_hook": quiet_placement_group_cleaner},
    )


def _loopback_only() -> None:
    """Make the Ray about to start here a single-machine one, on 127.0.0.1: through the environment
    (read by Ray when imported, and inherited by the raylet and the workers), and in Ray's constant if
    this process imported Ray already."""
    os.environ[LOOPBACK_ONLY] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
"""The logger of Ray Train's placement-group cleaner (an internal module, named by its path: Ray has no
public switch for its warnings); tests/unit/pipeline/test_ray_pins.py checks the name against Ray's."""


def quiet_placement_group_cleaner() -> None:
    """Worker setup hook of a local Ray without its dashboard. Every Ray Train run starts a placement-group
    cleaner that asks the dashboard's state API each second whether the run's controller still lives;
    with no dashboard to answer, it logs a warning each time (hundreds per demo). A local Ray dies with
    this process, leaving nothing for it to clean, so its warnings are dropped; errors still show."""
    import logging

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
