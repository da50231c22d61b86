"""A small web app from Python's standard library, as Kiln runs it.

It listens on $PORT (Kiln sets it in every instance), answers /healthz for
Kiln's health checks, and stops on SIGTERM, which Kiln sends once the instance
is out of rotation and its requests are done. Edit it, then run `kiln apply`.
"""

import os
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GREETING = "Hello from Kiln"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.reply(200, "ok\n")
        elif self.path == "/":
            self.reply(200, f"{GREETING} ({socket.gethostname()})\n")
        else:
            self.reply(404, "not found\n")

    def reply(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        if self.path != "/healthz":  # a probe a second would drown `kiln logs web`
            print(f"{self.address_string()} {format % args}", flush=True)


def main() -> None:
    port = int(os.environ["PORT"])
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"listening on port {port}", flush=True)
    server.serve_forever()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
