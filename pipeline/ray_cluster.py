"""Connecting to Ray: an in-process local Ray by default, a cluster with `--address` / `RAY_ADDRESS`.

A local Ray started here binds its dashboard to 127.0.0.1 (and does not start it at all unless asked),
so nothing listens on a public interface by default.
"""

from __future__ import annotations

import os
import threading

_INIT = threading.Lock()


def ensure_ray(address: str | None = None, dashboard: bool = False, num_cpus: int | None = None) -> None:
    """Initialise Ray once for this process: connect to `address` (or $RAY_ADDRESS) or start locally.

    Thread-safe: the pipeline's stages call it from their own threads.
    """
    with _INIT:
        _init(address, dashboard, num_cpus)


def _init(address: str | None, dashboard: bool, num_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
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
