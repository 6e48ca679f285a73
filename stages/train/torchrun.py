"""torchrun, with its rendezvous store listening on MASTER_ADDR's interface only:
`python -m stages.train.torchrun ARGS...` takes torchrun's arguments (`./launch.sh train` runs it).

Why: torchrun's static rendezvous starts a TCPStore server on node 0 that listens on every interface
whatever --master_addr says, so a cluster told to rendezvous on a private (or loopback) address still
exposes an unauthenticated key-value store on all of them. TCPStore can serve on a socket it is given
(`master_listen_fd`); this wrapper binds that socket to (master_addr, master_port) and hands it to the store
the static rendezvous creates. Everything else is torchrun's own `main`.
"""

from __future__ import annotations

import socket
import sys
from typing import Any


def bind_store_to_master_addr() -> None:
    """Make the static rendezvous's TCPStore server listen on its host name's address only."""
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous

    tcp_store = static_tcp_rendezvous.TCPStore
    listeners: list[socket.socket] = []  # kept open for the store's lifetime

    def bound_store(host: str, port: int, world_size: int, is_master: bool, *args: Any, **kw: Any) -> Any:
        if is_master and "master_listen_fd" not in kw:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            listener = socket.create_server(address[:2], family=family, backlog=4096)
            listeners.append(listener)
            kw["master_listen_fd"] = listener.fileno()
        return tcp_store(host, port, world_size, is_master, *args, **kw)

    static_tcp_rendezvous.TCPStore = bound_store


def main() -> None:
    from torch.distributed.run import main as torchrun_main

    bind_store_to_master_addr()
    sys.argv[0] = "torchrun"
    torchrun_main()


if __name__ == "__main__":
    main()
