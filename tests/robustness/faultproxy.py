"""A loopback TCP proxy whose faults can be switched at run time (tests only; stdlib only).

    proxy = FaultProxy(target_port).start()   # listens on 127.0.0.1:<random port>
    proxy.refuse()                             # every connection, new or live, is reset
    proxy.cut_after(2000)                      # forward 2000 more bytes per connection, then reset it
    proxy.passthrough()                        # forward everything again
    proxy.stop()

It sits between a client (pyarrow's S3 filesystem) and a server (moto) that must keep
its state: moto holds its buckets in memory, so an outage cannot be made by restarting it.

Modes:

* ``pass``: bytes flow both ways untouched.
* ``refuse``: an accepted connection is reset at once (RST, via ``SO_LINGER`` 0), and
  so is every live one (keep-alive connections would otherwise carry on through the
  "outage"). To the client this is a refused/reset connection: a transient network error.
* ``cut_after(n)``: each connection forwards at most ``n`` more bytes (both directions
  together, counted from the moment the mode was set, or from the accept) and is then
  reset, in the middle of a request or a response.

Counters (read them under no lock: ints, updated by the proxy's threads): ``accepted``
(connections seen), ``resets`` (connections the proxy killed), ``bytes_up`` (client to
server), ``bytes_down`` (server to client). Loopback only: it binds 127.0.0.1 and only
ever connects to 127.0.0.1.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

POLL_S = 0.02  # how quickly a live connection notices a mode switch
CHUNK = 64 * 1024


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN: the peer sees 'connection reset', not a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        if target_host not in ("127.0.0.1", "localhost"):
            raise ValueError("FaultProxy forwards to loopback only")
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._mode = "pass"
        self._budget = 0  # bytes per connection in cut mode
        self._generation = 0  # bumped at every mode switch: live connections re-read the mode
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        self.resets = 0
        self.bytes_up = 0
        self.bytes_down = 0

    # ------------------------------------------------------------------ control

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode if self._mode != "cut" else f"cut_after({self._budget})"

    def _set(self, mode: str, budget: int = 0) -> None:
        with self._lock:
            self._mode, self._budget = mode, budget
            self._generation += 1

    def passthrough(self) -> None:
        self._set("pass")

    def refuse(self) -> None:
        self._set("refuse")

    def cut_after(self, n_bytes: int) -> None:
        self._set("cut", int(n_bytes))

    def reset_counters(self) -> None:
        self.accepted = self.resets = self.bytes_up = self.bytes_down = 0

    def start(self) -> "FaultProxy":
        t = threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._listener.close()
        except OSError:
            pass
        for t in list(self._threads):
            t.join(timeout=2)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ work

    def _accept_loop(self) -> None:
        self._listener.settimeout(POLL_S * 5)
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # listener closed by stop()
            self.accepted += 1
            if self._mode == "refuse":
                self.resets += 1
                _reset(client)
                continue
            t = threading.Thread(target=self._serve, args=(client,), daemon=True, name=f"faultproxy-conn-{self.port}")
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self.resets += 1
            _reset(client)
            return
        sel = selectors.DefaultSelector()
        peer = {client: upstream, upstream: client}
        sel.register(client, selectors.EVENT_READ)
        sel.register(upstream, selectors.EVENT_READ)
        generation, budget = -1, None  # budget: bytes left before the cut (None: unlimited)
        open_ends = 2
        try:
            while not self._stopping.is_set() and open_ends:
                with self._lock:
                    if generation != self._generation:
                        generation = self._generation
                        mode, budget = self._mode, (self._budget if self._mode == "cut" else None)
                if mode == "refuse" or (budget is not None and budget <= 0):
                    self.resets += 1
                    break
                for key, _ in sel.select(POLL_S):
                    src = key.fileobj
                    want = CHUNK if budget is None else min(CHUNK, budget)
                    try:
                        data = src.recv(want)
                    except OSError:
                        data = b""
                    if not data:  # one side closed: pass the half-close on
                        sel.unregister(src)
                        open_ends -= 1
                        try:
                            peer[src].shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    peer[src].sendall(data)
                    if src is client:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                    if budget is not None:
                        budget -= len(data)
                        if budget <= 0:
                            break
        except OSError:
            pass
        finally:
            sel.close()
            _reset(client)
            _reset(upstream)


def wait_for(pred, timeout_s: float = 5.0) -> bool:
    """Poll ``pred`` until true or ``timeout_s`` passes (for counters updated by proxy threads)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())
