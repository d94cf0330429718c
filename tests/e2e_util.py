"""Helpers shared by the Python end-to-end tests (http_test.py, browser_test.py): a free loopback port, and waiting
for a server's /healthz."""
import socket
import time
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_healthy(base, proc=None, ctx=None, tries=150):
    """True once base/healthz answers; False after `tries` 0.1-s waits or when proc has exited."""
    for _ in range(tries):
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1, context=ctx).read()
            return True
        except Exception:
            if proc is not None and proc.poll() is not None:
                return False
            time.sleep(0.1)
    return False
