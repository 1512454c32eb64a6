#!/usr/bin/env python3
"""Memory a proxy keeps per open connection, after one request on each.

    python3 benches/conn_mem.py PID PORT N PROTO TLS

Opens N connections to 127.0.0.1:PORT (TLS when TLS is 1, ALPN h2 or
http/1.1 as PROTO is h2 or h1), sends one GET / on each and reads its
response, keeps them all open, and prints the growth of the process's
anonymous resident memory (RssAnon, /proc/PID/status) divided by N, in
bytes per connection. The connections then close.
"""
import resource
import socket
import ssl
import sys
import time


def rss_anon(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no RssAnon")


def h2_request():
    # Preface, empty SETTINGS, HEADERS (stream 1, END_STREAM|END_HEADERS):
    # :method GET, :scheme https, :path /, :authority x (HPACK static
    # indexes; the authority as a literal without indexing).
    block = bytes([0x82, 0x87, 0x84, 0x01, 0x01]) + b"x"
    headers = len(block).to_bytes(3, "big") + bytes([0x01, 0x05]) + (1).to_bytes(4, "big") + block
    settings = bytes([0, 0, 0, 0x04, 0, 0, 0, 0, 0])
    return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + headers


def read_response(s, proto):
    """Reads until the response's end (h1: the body of Content-Length; h2:
    a frame with END_STREAM on stream 1)."""
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("connection closed before the response ended")
        buf += chunk
        if proto == "h1":
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                if len(body) >= length:
                    return
        else:
            i = 0
            while i + 9 <= len(buf):
                n = int.from_bytes(buf[i:i + 3], "big")
                typ, flags = buf[i + 3], buf[i + 4]
                sid = int.from_bytes(buf[i + 5:i + 9], "big") & 0x7FFFFFFF
                if i + 9 + n > len(buf):
                    break
                if sid == 1 and typ in (0, 1) and flags & 0x1:
                    return
                i += 9 + n


def main():
    pid, port, n, proto, tls = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                sys.argv[4], sys.argv[5] == "1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 64)), hard))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2" if proto == "h2" else "http/1.1"])
    req = h2_request() if proto == "h2" else b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    # Warm-up: the first connections allocate lazily built state.
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", port))
        s = ctx.wrap_socket(s) if tls else s
        s.sendall(req)
        read_response(s, proto)
        s.close()
    time.sleep(0.5)
    before = rss_anon(pid)
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s = ctx.wrap_socket(s) if tls else s
        s.sendall(req)
        read_response(s, proto)
        conns.append(s)
    time.sleep(0.5)
    after = rss_anon(pid)
    print((after - before) // n)
    for s in conns:
        s.close()


if __name__ == "__main__":
    main()
