"""A Docker/OCI token server for tests (distribution's `auth.token` protocol).

It authenticates users with Basic credentials (or none, for anonymous), grants the pull/push
actions its ACL allows for the requested scopes, and signs RS256 JWTs with a key whose
self-signed certificate goes into the registry's `rootcertbundle` (the JWT carries it in
`x5c`). The ACL can change while it runs, which is how tests revoke a user.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.support.procs import free_port

ANONYMOUS = ""  # the ACL key for requests without credentials


class TokenServer:
    def __init__(self, workdir: Path, *, service: str, issuer: str = "shoal-test-issuer",
                 users: dict[str, str], acl: dict[str, dict[str, set[str]]], token_ttl: int = 300) -> None:
        """`acl[user][repository] = {"pull", "push"}`; user "" is anonymous."""
        self.service = service
        self.issuer = issuer
        self.users = dict(users)
        self.acl = {u: {r: set(a) for r, a in repos.items()} for u, repos in acl.items()}
        self.token_ttl = token_ttl
        self.issued: list[str] = []  # every token handed out (tests grep logs for them)
        self._lock = threading.Lock()
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .sign(self.key, hashes.SHA256()))
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path = workdir / "token-signer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.port = free_port()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._handle(self)

            def do_POST(self) -> None:
                server._handle_oauth(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth_yaml(self) -> str:
        return ("auth:\n  token:\n"
                f"    realm: {self.realm}\n    service: {self.service}\n    issuer: {self.issuer}\n"
                f"    rootcertbundle: {self.cert_path}\n")

    def grant(self, user: str, repo: str, *actions: str) -> None:
        with self._lock:
            self.acl.setdefault(user, {}).setdefault(repo, set()).update(actions)

    def revoke(self, user: str, repo: str) -> None:
        with self._lock:
            self.acl.get(user, {}).pop(repo, None)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def token(self, user: str, scopes: list[str]) -> str:
        """A token as the server would issue it to `user` (tests use it as a client would)."""
        return self._issue(user, scopes)

    # ----- protocol -------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        if url.path != "/token":
            h.send_error(404)
            return
        query = parse_qs(url.query)
        user = ANONYMOUS
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                name, password = "", ""
            if self.users.get(name) != password or not name:
                self._reply(h, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                return
            user = name
        if query.get("service", [""])[0] != self.service:
            self._reply(h, 400, {"errors": [{"code": "DENIED", "message": "unknown service"}]})
            return
        token = self._issue(user, query.get("scope", []))
        self._reply(h, 200, {"token": token, "access_token": token, "expires_in": self.token_ttl,
                             "issued_at": datetime.datetime.now(datetime.UTC).isoformat()})

    def _handle_oauth(self, h: BaseHTTPRequestHandler) -> None:
        """The OAuth2 form (what containerd tries first): grant_type=password with the user's
        credentials in the body (see distribution's docs/spec/auth/oauth.md)."""
        length = int(h.headers.get("Content-Length", "0"))
        form = parse_qs(h.rfile.read(length).decode())
        if urlsplit(h.path).path != "/token" or form.get("grant_type", [""])[0] != "password":
            self._reply(h, 400, {"error": "unsupported_grant_type"})
            return
        user = form.get("username", [""])[0]
        if not user or self.users.get(user) != form.get("password", [""])[0]:
            self._reply(h, 401, {"error": "invalid_grant"})
            return
        if form.get("service", [""])[0] != self.service:
            self._reply(h, 400, {"error": "invalid_request"})
            return
        scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
        token = self._issue(user, scopes)
        self._reply(h, 200, {"access_token": token, "expires_in": self.token_ttl, "scope": " ".join(scopes)})

    def _issue(self, user: str, scopes: list[str]) -> str:
        access = []
        with self._lock:
            granted = self.acl.get(user, {})
            for scope in scopes:
                kind, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind != "repository":
                    continue
                allowed = granted.get(name, set()) & set(actions.split(","))
                if allowed:
                    access.append({"type": "repository", "name": name, "actions": sorted(allowed)})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + self.token_ttl,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        der = self.cert.public_bytes(serialization.Encoding.DER)
        token = jwt.encode(claims, self.key, algorithm="RS256",
                           headers={"x5c": [base64.b64encode(der).decode()]})
        with self._lock:
            self.issued.append(token)
        return token

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
