"""Test helper: run an ASGI app under a real uvicorn server on a free loopback port."""
import contextlib
import socket
import threading
import time

import uvicorn


@contextlib.contextmanager
def serve(app):
    """Run `app` under uvicorn in a thread on a free loopback port (the socket is bound first: no race)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
