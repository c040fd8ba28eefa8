#!/usr/bin/env python3
"""A registry front that requires bearer tokens, for Swiftlet's registry-client tests.

    token-proxy.py PORT REGISTRY_PORT

Requests to /v2/... without `Authorization: Bearer <token>` get 401 and a Bearer challenge whose
realm is this server's /token; /token answers {"token": ...} for a pull scope; requests with the
token are passed to the registry on REGISTRY_PORT (redirects and all, as they come)."""
import http.client
import http.server
import json
import sys

PORT, REGISTRY = int(sys.argv[1]), int(sys.argv[2])
TOKEN = "swiftlet-test-token"


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
        if self.path.startswith("/token"):
            if "scope=repository%3A" not in self.path or "service=test-registry" not in self.path:
                return self.send(400, b'{"error": "missing scope or service"}')
            return self.send(200, json.dumps({"token": TOKEN}).encode(), [("Content-Type", "application/json")])
        if self.headers.get("Authorization") != "Bearer " + TOKEN:
            challenge = f'Bearer realm="http://127.0.0.1:{PORT}/token",service="test-registry"'
            return self.send(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}', [("WWW-Authenticate", challenge)])
        upstream = http.client.HTTPConnection("127.0.0.1", REGISTRY, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "host")}
        upstream.request("GET", self.path, headers=headers)
        reply = upstream.getresponse()
        body = reply.read()
        keep = [(k, v) for k, v in reply.getheaders() if k.lower() not in ("content-length", "transfer-encoding", "connection")]
        self.send(reply.status, body, keep)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
