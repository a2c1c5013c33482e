"""GET /metrics of a loopback-only shoal agent, served on the node's address for Prometheus.

The agent's mirror listens on 127.0.0.1 (containerd reaches it there; other hosts must not), so
Prometheus cannot scrape it. This sidecar forwards GET /metrics, and nothing else, to the agent:
the mirror API stays unreachable from the network. Standard library only (it runs from the
shoal image with python3): python3 metrics_proxy.py LISTEN_HOST:PORT http://127.0.0.1:5050
"""

from __future__ import annotations

import http.client
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

TIMEOUT = 10.0  # seconds; Prometheus' own scrape timeout is shorter by default
MAX_BYTES = 64 << 20  # a metrics page is tens of KiB; never buffer an unbounded answer


class Handler(BaseHTTPRequestHandler):
    target = ""
    server_version = "shoal-metrics-proxy"
    timeout = TIMEOUT  # a client that sends nothing does not hold a thread

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        # http.client to the one address: no proxy from the environment, no redirect followed
        target = urlsplit(self.target)
        conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port or 80, timeout=TIMEOUT)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            body = resp.read(MAX_BYTES + 1)
            ctype = resp.getheader("Content-Type", "text/plain")
            if resp.status != 200:
                raise OSError(f"agent answered {resp.status}")
        except (OSError, http.client.HTTPException):
            self.send_error(502, "agent unreachable")
            return
        finally:
            conn.close()
        if len(body) > MAX_BYTES:
            self.send_error(502, "agent answer too large")
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per scrape is noise; failures show as 502 in Prometheus


class V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6  # a node whose address is IPv6


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: metrics_proxy.py LISTEN_HOST:PORT AGENT_URL", file=sys.stderr)
        return 2
    host, _, port = argv[0].rpartition(":")
    host = host.strip("[]")  # the chart passes [$(HOST_IP)]:PORT, for IPv4 and IPv6 nodes alike
    Handler.target = argv[1].rstrip("/")
    server_class = V6Server if ":" in host else ThreadingHTTPServer
    server = server_class((host, int(port)), Handler)
    server.daemon_threads = True
    server.serve_forever()  # until SIGTERM (the kubelet's stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
