"""The HTTP port: liveness, readiness with reasons, Prometheus metrics, token access."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomnode.app.node import Node
from dicomnode.config import HttpSettings, load_config
from dicomnode.errors import ConfigError
from dicomnode.net.scu import Peer, send_files


def start_with_http(node_factory: Callable[..., Node], **http: object) -> Node:
    base = node_factory(start=False).config
    config = dataclasses.replace(base, http=HttpSettings(enabled=True, port=0, **http))  # type: ignore[arg-type]
    node = Node(config)
    node.start()
    return node


def get(node: Node, path: str, token: str = "") -> tuple[int, str]:
    assert node.http is not None
    request = urllib.request.Request(f"http://127.0.0.1:{node.http.port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_readiness_and_metrics(
    node_factory: Callable[..., Node], phantom_files: list[Path]
) -> None:
    node = start_with_http(node_factory)
    try:
        assert get(node, "/healthz") == (200, "ok")
        status, body = get(node, "/readyz")
        assert status == 200 and json.loads(body) == {"ready": True, "reasons": []}
        results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), phantom_files, "PACS")
        assert all(r.ok for r in results)
        status, text = get(node, "/metrics")
        assert status == 200
        assert 'dicomnode_studies{state="receiving"} 1.0' in text
        assert 'dicomnode_jobs{state="queued"} 0.0' in text
        assert "dicomnode_disk_free_bytes" in text
    finally:
        node.stop(timeout=30)


def test_not_ready_says_why(node_factory: Callable[..., Node]) -> None:
    node = start_with_http(node_factory)
    try:
        object.__setattr__(node.spool, "min_free_bytes", 2**62)  # a disk below the watermark
        status, body = get(node, "/readyz")
        assert status == 503
        (reason,) = json.loads(body)["reasons"]
        assert "below the watermark" in reason
    finally:
        node.stop(timeout=30)


def test_a_token_guards_everything_but_the_probes(node_factory: Callable[..., Node]) -> None:
    node = start_with_http(node_factory, token="s3cret")
    try:
        assert get(node, "/metrics")[0] == 401
        assert get(node, "/metrics", token="wrong")[0] == 401
        assert get(node, "/metrics", token="s3cret")[0] == 200
        assert get(node, "/healthz")[0] == 200
    finally:
        node.stop(timeout=30)


def test_binding_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[http]\nenabled = true\nbind_address = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match=r"'http'.*not loopback: set token"):
        load_config(config)
    config.write_text(
        '[http]\nenabled = true\nbind_address = "0.0.0.0"\ntoken = "${NO_SUCH_VAR_X}"\n'
    )
    with pytest.raises(ConfigError, match="environment variable that is not set"):
        load_config(config)
