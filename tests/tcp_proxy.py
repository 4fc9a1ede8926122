"""A TCP proxy for tests: forwards local connections to the broker and cuts them on demand.

A process that connects through it sees its connection drop as it would when a
network path fails: the proxy closes both sides, so the client reads end-of-stream
and the broker sees its client vanish (and requeues what that client had not acked).
Or the network goes silent, as in a partition: nothing passes, and nothing closes. Or
only what the broker sends is lost: the client's frames still reach the broker.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class Link:
    """One proxied connection: the accepted socket and the one to the target."""

    def __init__(
        self,
        downstream: socket.socket,
        upstream: socket.socket,
        on_closed: Callable[[Link], None],
        silent: threading.Event,
        deaf: threading.Event,
    ) -> None:
        self.sockets = (downstream, upstream)
        self.silent, self.deaf = silent, deaf
        self.on_closed = on_closed
        self.pumps_left = 2
        self.lock = threading.Lock()

    def pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            from_broker = source is self.sockets[1]
            while data := source.recv(65536):
                if self.silent.is_set() or (from_broker and self.deaf.is_set()):
                    continue  # lost, as in a partition
                target.sendall(data)
        except OSError:
            pass  # cut, or reset by either end
        self.cut()
        with self.lock:
            self.pumps_left -= 1
            last = self.pumps_left == 0
        if last:  # close only once no thread reads the sockets any more
            for sock in self.sockets:
                sock.close()
            self.on_closed(self)

    def cut(self) -> None:
        # NOTE: shutdown, not close, wakes a thread blocked in recv() on the socket.
        for sock in self.sockets:
            with contextlib.suppress(OSError):  # not connected any more
                sock.shutdown(socket.SHUT_RDWR)


class TcpProxy:
    """Listens on 127.0.0.1 (an ephemeral port) and forwards each connection to target."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # so that the accept loop notices close()
        self.port: int = self.listener.getsockname()[1]
        self.refusing = False  # when set, new connections are closed as soon as accepted
        self.silent = threading.Event()  # when set, open connections pass nothing on
        self.deaf = threading.Event()  # when set, they pass on nothing from the target
        self.accepted = 0  # connections forwarded so far
        self.links: list[Link] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                downstream, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            downstream.settimeout(None)
            if self.refusing:
                downstream.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            link = Link(downstream, upstream, self._forget, self.silent, self.deaf)
            with self.lock:
                self.links.append(link)
                self.accepted += 1
            for source, target in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=link.pump, args=(source, target), daemon=True).start()

    def _forget(self, link: Link) -> None:
        with self.lock:
            if link in self.links:
                self.links.remove(link)

    def drop_all(self) -> int:
        """Cut every connection open through the proxy; return how many there were."""
        with self.lock:
            links, self.links = self.links, []
        for link in links:
            link.cut()
        return len(links)

    def close(self) -> None:
        self.closed.set()
        self.thread.join()
        self.listener.close()
        self.drop_all()
