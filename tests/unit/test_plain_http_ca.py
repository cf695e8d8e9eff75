"""The CA file hxp gives Prefect's clients of its local plain-HTTP server: one certificate
that Python's TLS layer accepts (a file it refused would break every Prefect client)."""

from __future__ import annotations

import ssl
from pathlib import Path

from hxp.io.prefect_server import plain_http_ca_file


def test_one_certificate_that_loads(tmp_path: Path) -> None:
    path = plain_http_ca_file(tmp_path)
    assert path == tmp_path / "prefect" / "plain-http-ca.pem"
    text = path.read_text()
    assert text.count("-----BEGIN CERTIFICATE-----") == 1
    assert text.count("-----END CERTIFICATE-----") == 1
    context = ssl.create_default_context(cafile=str(path))
    assert len(context.get_ca_certs()) == 1
    assert plain_http_ca_file(tmp_path) == path  # written once, kept
    assert not list(path.parent.glob("*.tmp"))
