#!/usr/bin/env python3
"""A fake registry that tries to draw credentials out of Swiftlet, for the registry-client tests.

    credential-probe.py PORT LOG MODE [TARGET] [CERT KEY]

Every request is logged to LOG as "SCHEME PATH AUTHORIZATION" ("-" when there is none).
MODE:
  realm     /v2/... answers 401 with a Bearer challenge whose realm is TARGET ("self": this server's
            /token); /token answers a token.
  redirect  /v2/... over TLS answers 401 Basic without credentials and, with them, a 307 to TARGET
            ("self-http": the same host, as the request named it, over plain HTTP); plain-HTTP requests get 404.
  sink      /token answers a token; everything else 404.
With CERT and KEY, connections that start with a TLS handshake are served over TLS (the same port
also serves plain HTTP)."""
import http.server
import json
import socket
import ssl
import sys
import threading

PORT, LOG, MODE = int(sys.argv[1]), sys.argv[2], sys.argv[3]
TARGET = sys.argv[4] if len(sys.argv) > 4 else ""
CONTEXT = None
if len(sys.argv) > 6:
    CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    CONTEXT.load_cert_chain(sys.argv[5], sys.argv[6])
LOCK = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        tls = isinstance(self.connection, ssl.SSLSocket)
        auth = self.headers.get("Authorization") or "-"
        with LOCK, open(LOG, "a") as log:
            log.write(f"{'https' if tls else 'http'} {self.path} {auth}\n")
        if self.path.startswith("/token"):
            return self.send(200, json.dumps({"token": "probe-token"}).encode(), [("Content-Type", "application/json")])
        if MODE == "realm" and self.path.startswith("/v2/"):
            realm = f"http://127.0.0.1:{PORT}/token" if TARGET == "self" else TARGET
            return self.send(401, b"{}", [("WWW-Authenticate", f'Bearer realm="{realm}",service="probe"')])
        if MODE == "redirect" and self.path.startswith("/v2/") and tls:
            if auth == "-":
                return self.send(401, b"{}", [("WWW-Authenticate", 'Basic realm="probe"')])
            target = f"http://{self.headers.get('Host')}{self.path}" if TARGET == "self-http" else TARGET
            return self.send(307, b"", [("Location", target)])
        return self.send(404, b"{}")

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    def get_request(self):
        sock, address = self.socket.accept()
        if CONTEXT is not None and sock.recv(1, socket.MSG_PEEK) == b"\x16":
            sock = CONTEXT.wrap_socket(sock, server_side=True)
        return sock, address


Server(("127.0.0.1", PORT), Handler).serve_forever()
