"""Connecting to Ray: an in-process local Ray by default, a cluster with `--address` / `RAY_ADDRESS`.

A local Ray started here is private to this machine: its node address is 127.0.0.1, so the GCS, the
raylet, the object manager, the runtime-env agent and every worker's gRPC server listen on the loopback
interface only, and its dashboard (not started at all unless asked) binds to 127.0.0.1. Nothing listens
on a public interface (tests/integration/test_ray_bind.py checks every listening socket of a real
session). Ray itself, left alone, turns 127.0.0.1 into the machine's routable address and listens on
all interfaces; what keeps it on loopback is Ray's single-machine switch, `LOOPBACK_ONLY` below.

A cluster (`launch.sh ray-head` / `ray-worker`, both `pipeline.ray_start`) may be on loopback too: a
head started with `--node-ip-address=127.0.0.1` and workers joining `127.0.0.1:PORT` are several nodes
of one machine, every socket on 127.0.0.1 (`loopback_cluster_node`; tests/integration/test_ray_nodes.py).
A driver given 127.0.0.1:PORT of such a cluster stays on loopback as well, instead of Ray's rewriting
the address to the routable one, where nothing listens (a head on the routable address may still be
given as 127.0.0.1:PORT on its machine: Ray's rewriting is right for it).

Authentication: every node and driver picks Ray's token mode by one rule, Ray's own for a head
(`agree_on_auth`): RAY_AUTH_MODE when set, else token auth when a token is available (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), else none. Left alone, Ray applies that rule to a head only, so
on a machine with a token a worker or a driver given an address was refused (InvalidAuthToken). Before
connecting, `check_cluster` asks the address once, so an unreachable head or a refused token is one
clear line within seconds, not minutes of Ray's retries.

The head's dashboard binds to 127.0.0.1 unless `RAY_DASHBOARD_HOST` says otherwise.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator

_INIT = threading.Lock()

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch between a cluster node (routable address, every interface) and a single machine
(loopback only), named for the platforms where Ray defaults to the latter; set to 0 for a local Ray.
Ray reads it into `ray._private.ray_constants.ENABLE_RAY_CLUSTER` when first imported;
tests/unit/pipeline/test_ray_pins.py checks both names against Ray's."""

AUTH_MODE = "RAY_AUTH_MODE"
"""Ray's authentication mode: `token` or `disabled`; set by `agree_on_auth` when unset."""

LOCALHOST = "127.0.0.1"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
"""The names Ray rewrites to the routable address (its `is_localhost`)."""

CONNECT_TIMEOUT_S = 10.0
"""How long `check_cluster` waits for a head's GCS port to accept a connection."""


class ClusterUnreachable(ValueError):
    """A Ray address that no cluster answers, or whose cluster refuses this process's authentication."""


def ensure_ray(address: str | None = None, dashboard: bool = False, num_cpus: int | None = None) -> None:
    """Initialise Ray once for this process: connect to `address` (or $RAY_ADDRESS) or start locally.

    Thread-safe: the pipeline's stages call it from their own threads. Raises ClusterUnreachable when
    `address` names no reachable cluster or its cluster refuses this process's token.
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
        agree_on_auth()
        nodes = check_cluster(address)
        if is_loopback(address_host(address)) and LOCALHOST in nodes:
            _loopback_only()  # a loopback cluster: this driver's node address is 127.0.0.1 too
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


def address_host(address: str) -> str:
    """The host of a `host:port` Ray address (`ray://` and `[v6]` forms included)."""
    return address.split("://", 1)[-1].rpartition(":")[0].strip("[]")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES


def _loopback_only() -> None:
    """Make the Ray about to start here a single-machine one, on 127.0.0.1: through the environment
    (read by Ray when imported, and inherited by the raylet and the workers), and in Ray's constant if
    this process imported Ray already. A driver of a loopback cluster gets the same: its own address
    and the cluster's stay 127.0.0.1."""
    os.environ[LOOPBACK_ONLY] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def loopback_cluster_node() -> None:
    """Make the `ray start` about to run in this process start a node of a cluster on 127.0.0.1.

    Ray's single-machine switch keeps every process the node starts on loopback (they inherit it), but
    it also makes `ray start` refuse to join a head; so in this process only, the switch stays on and
    the one function through which Ray rewrites 127.0.0.1 (`services.resolve_ip_for_localhost`, used
    for `--address` and `--node-ip-address`) keeps loopback names as they are.
    """
    os.environ[LOOPBACK_ONLY] = "0"
    from ray._private import ray_constants, services

    ray_constants.ENABLE_RAY_CLUSTER = True
    rewrite = services.resolve_ip_for_localhost

    def keep_loopback(host: str) -> str:
        return LOCALHOST if is_loopback(host) else rewrite(host)

    services.resolve_ip_for_localhost = keep_loopback


def agree_on_auth() -> str:
    """Set RAY_AUTH_MODE for this process and its children by the rule `ray start --head` uses (see the
    module docstring), so that a head, its workers and its drivers on machines with the same token
    agree; returns the mode."""
    if AUTH_MODE not in os.environ:
        from ray._private.authentication import authentication_token_setup
        from ray._raylet import AuthenticationTokenLoader

        if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
            authentication_token_setup._enable_token_auth()  # the variable, and Ray's cached config
        else:
            os.environ[AUTH_MODE] = "disabled"
    return os.environ[AUTH_MODE]


def check_cluster(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> list[str]:
    """The node addresses of the Ray cluster at `address`. Raises ClusterUnreachable, in one line, when
    no Ray head answers there within `timeout_s` or when it refuses this process's authentication; Ray
    itself retries either for minutes."""
    if "://" in address:  # ray:// (Ray Client) goes through its own server
        return []
    try:
        port = int(address.rpartition(":")[2])
        socket.create_connection((address_host(address), port), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise ClusterUnreachable(
            f"no Ray cluster answers at {address} ({getattr(err, 'strerror', None) or err}): start one with "
            "`./launch.sh ray-head` (its port is RAY_PORT) or fix --address / RAY_ADDRESS"
        ) from None
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        with _quiet_stderr():
            client = GcsClient(address=address)
    except AuthenticationError:
        raise ClusterUnreachable(
            f"the Ray cluster at {address} refused this process's authentication "
            f"({AUTH_MODE}={os.environ.get(AUTH_MODE, 'disabled')}): use the head's token here "
            "(copy its ~/.ray/auth_token, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) and its mode"
        ) from None
    return [node.node_manager_address for node in client.get_all_node_info(timeout=timeout_s).values()]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for a moment: Ray's C++ client logs each refused attempt there
    itself, around the one line the caller prints."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
