"""The shop front end: a tiny HTTP/1.1 server that needs only python3-minimal.

It listens on $PORT (Kiln sets it), answers /healthz, and on SIGTERM stops
accepting, finishes the requests in flight and exits.
"""

import os
import signal
import socket
import sys
import threading
import time

VERSION = "1"
GREETING = os.environ.get("GREETING", "hello")
HOST = socket.gethostname()
stopping = threading.Event()
in_flight = 0
lock = threading.Lock()


def respond(conn, status, body, keep_alive):
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    conn.sendall(head.encode() + body)


def serve(conn):
    global in_flight
    conn.settimeout(30)
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _version = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (h.split(":", 1) for h in lines[1:] if ":" in h)
            }
            length = int(headers.get("content-length", "0"))
            while len(buf) < length:
                buf += conn.recv(65536)
            buf = buf[length:]
            with lock:
                in_flight += 1
            try:
                if path == "/healthz":
                    status, body = "200 OK", b"ok\n"
                elif path.startswith("/slow"):
                    time.sleep(1.0)
                    status, body = "200 OK", b"slow\n"
                else:
                    status, body = (
                        "200 OK",
                        f"{GREETING} from {HOST} (version {VERSION})\n".encode(),
                    )
                keep = headers.get("connection", "").lower() != "close" and not stopping.is_set()
                respond(conn, status, body if method != "HEAD" else b"", keep)
                if path != "/healthz":
                    # one write per line: print() from threads interleaves its pieces
                    sys.stdout.write(f"{method} {path} 200\n")
                    sys.stdout.flush()
            finally:
                with lock:
                    in_flight -= 1
            if not keep:
                return
    except (OSError, ValueError):
        return
    finally:
        conn.close()


def main():
    port = int(os.environ.get("PORT", "8080"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # lets a replacement bind the same port before this one leaves (host networking)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(128)
    sock.settimeout(0.2)

    def on_term(signum, frame):
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    print(f"shop v{VERSION} listening on :{port} as uid {os.getuid()}", flush=True)
    while not stopping.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            break
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    sock.close()
    deadline = time.time() + 5
    while in_flight and time.time() < deadline:
        time.sleep(0.05)
    print("shop stopped cleanly", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
