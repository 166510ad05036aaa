"""A TCP proxy on 127.0.0.1 that loses and trickles answers, for the crash harness.

Each accepted connection gets a mode, drawn from a seeded random.Random:

- "pass":    both directions forwarded as they come;
- "lose":    the request reaches the server, which applies it, but the answer is dropped and the
             client's connection closed as soon as the server starts answering (an answer lost
             after the server stored it: the case idempotent creates exist for);
- "trickle": the answer is forwarded in pieces of a few bytes with a pause between them.

Standard library only; every thread ends when the proxy is closed.
"""

from __future__ import annotations

import random
import socket
import threading
import time

MODES = ("pass", "lose", "trickle")


class LossyProxy:
    def __init__(
        self,
        target_port: int,
        seed: int,
        weights: tuple[float, float, float] = (2, 1, 1),
        trickle_bytes: int = 256,
        trickle_pause: float = 0.01,
    ) -> None:
        self.target = ("127.0.0.1", target_port)
        self.rng = random.Random(seed)
        self.weights = weights
        self.trickle_bytes = trickle_bytes
        self.trickle_pause = trickle_pause
        self.counts = {m: 0 for m in MODES}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def __enter__(self) -> LossyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for sock in list(self._socks):
                _close(sock)
            self._socks.clear()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                mode = self.rng.choices(MODES, self.weights)[0]
                self.counts[mode] += 1
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._socks.update((client, upstream))
            for args in ((client, upstream, "pass"), (upstream, client, mode)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, mode: str) -> None:
        try:
            src.settimeout(0.5)  # inside: the other direction may have closed it already
            while not self._stop.is_set():
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                if mode == "lose":
                    break  # the server answered: drop it and the client's connection
                if mode == "trickle":
                    for i in range(0, len(data), self.trickle_bytes):
                        if self._stop.is_set():
                            return
                        dst.sendall(data[i : i + self.trickle_bytes])
                        time.sleep(self.trickle_pause)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
