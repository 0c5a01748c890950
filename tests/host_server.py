"""A TCP server on the host that records every connection a sandboxed program manages to open."""

import socket
import threading
from contextlib import contextmanager


@contextmanager
def listening_server():
    """Yields `(port, accepted)`: a server on 127.0.0.1 accepts in a thread until the block ends; `accepted` lists
    the connections that reached it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        server.close()
