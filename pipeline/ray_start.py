"""`ray start` for `launch.sh ray-head` / `ray-worker`: Ray's own command, with three differences.

- A node given `--node-ip-address=127.0.0.1` (implied for a worker joining a loopback head) stays
  on loopback, with every socket on 127.0.0.1, so several nodes of one cluster run on one machine
  (`ray_cluster.loopback_cluster_node`); Ray alone rewrites 127.0.0.1 to the routable address, where a
  loopback head does not listen, and retries that for minutes.
- The node picks its authentication mode by the head's rule (`ray_cluster.agree_on_auth`).
- A worker first checks that the head answers and accepts its token (`ray_cluster.check_cluster`):
  otherwise one line and exit status 2.

Usage: `python -m pipeline.ray_start [RAY-START-OPTION...]`, e.g. `--head --port 6379` or
`--address HOST:PORT`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline.ray_cluster import (
    LOCALHOST,
    ClusterUnreachable,
    address_host,
    agree_on_auth,
    check_cluster,
    is_loopback,
    loopback_cluster_node,
)


def _option(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in `argv` (the last one), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    address = _option(argv, "--address")
    if "--head" not in argv and not address:
        print("ray_start: give --head, or --address HOST:PORT of a head", file=sys.stderr)
        return 2
    agree_on_auth()
    nodes: list[str] = []
    if address and "--head" not in argv:
        try:
            nodes = check_cluster(address)
        except ClusterUnreachable as err:
            print(f"ray-worker: {err}", file=sys.stderr)
            return 2
    node_ip = _option(argv, "--node-ip-address")
    if node_ip is None and address and is_loopback(address_host(address)) and LOCALHOST in nodes:
        node_ip = LOCALHOST  # joining a loopback head
        argv.append(f"--node-ip-address={LOCALHOST}")
    if node_ip is not None and is_loopback(node_ip):
        loopback_cluster_node()
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", "start", *argv]
    try:
        ray_main()
    except SystemExit as done:  # click ends with SystemExit; keep its status
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
