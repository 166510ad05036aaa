"""TLS: verification on by default, `ca_bundle` as an extra CA, `verify_tls = false`.

A tiny HTTPS job server of ours on 127.0.0.1, with a certificate from a throw-away CA made by
openssl in the test's temporary directory.
"""

from __future__ import annotations

import http.server
import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]


def _make_ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=jobsyncd test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    )
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"jobs": [], "next_cursor": None}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"e1"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    ca, cert, key = _make_ca_and_server_cert(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ca
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _sync(cli) -> tuple[int, dict, str]:
    proc = cli("sync", "--json")
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def test_an_unknown_ca_is_a_tls_failure_by_default(cli, https_server):
    url, _ = https_server
    cli.env["JOBSYNCD_SERVER_URL"] = url
    code, summary, stderr = _sync(cli)
    assert code == 1 and summary["skipped"] == "tls", stderr
    assert stderr.startswith("jobsyncd: error:") and "Traceback" not in stderr


def test_ca_bundle_adds_a_ca_the_server_certificate_is_verified_against(cli, https_server):
    url, ca = https_server
    cli.env["JOBSYNCD_SERVER_URL"] = url
    cli.env["JOBSYNCD_CA_BUNDLE"] = str(ca)
    code, summary, stderr = _sync(cli)
    assert code == 0 and summary["ok"] is True, stderr


def test_ca_bundle_adds_to_the_default_cas_rather_than_replacing_them(tmp_path, https_server):
    from jobsyncd.remote import _context_with_extra_ca

    _, ca = https_server
    context = _context_with_extra_ca(None, str(ca))
    assert len(context.get_ca_certs()) > 1
    assert any(
        c.get("subject") == ((("commonName", "jobsyncd test CA"),),) for c in context.get_ca_certs()
    )


def test_verify_tls_false_accepts_the_unknown_ca(cli, https_server):
    url, _ = https_server
    cli.env["JOBSYNCD_SERVER_URL"] = url
    cli.env["JOBSYNCD_VERIFY_TLS"] = "false"
    code, summary, stderr = _sync(cli)
    assert code == 0 and summary["ok"] is True, stderr
