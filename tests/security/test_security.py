"""Who may connect (AE titles, hosts, called AE), DICOM TLS, audit trail, retention."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicomnode.app.node import Node
from dicomnode.audit import read_audit
from dicomnode.config import AllowedCaller, Config, TlsSettings
from dicomnode.errors import DeliveryError
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, echo, send_files
from dicomnode.net.tls import client_context
from dicomnode.synthetic.phantom import Phantom

from .pki import Pki, make_pki

NodeFactory = Callable[..., Node]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is required in CI")
        pytest.skip("openssl is not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def started() -> Iterator[list[Node]]:
    nodes: list[Node] = []
    yield nodes
    for node in nodes:
        node.stop(timeout=30)


def start_with(node_factory: NodeFactory, started: list[Node], **node_changes: object) -> Node:
    base = node_factory(start=False).config
    config = dataclasses.replace(base, node=dataclasses.replace(base.node, **node_changes))
    node = Node(config)
    node.start()
    started.append(node)
    return node


def test_unknown_callers_and_wrong_hosts_are_rejected_at_association_time(
    node_factory: NodeFactory, started: list[Node]
) -> None:
    # Given a node that admits PACS from 127.0.0.1 and OTHER only from another host
    node = start_with(
        node_factory,
        started,
        allowed_callers=(
            AllowedCaller("PACS", ("127.0.0.1",)),
            AllowedCaller("OTHER", ("192.0.2.7",)),
        ),
    )
    peer = Peer("DICOMNODE", "127.0.0.1", node.port, 5.0)
    # Then PACS gets in, the others are rejected permanently before any DIMSE
    assert echo(peer, "PACS") == 0
    for caller in ("STRANGER", "OTHER"):
        with pytest.raises(DeliveryError, match="rejected") as err:
            echo(peer, caller)
        assert err.value.transient is False
    # And a wrong called AE title is rejected too
    with pytest.raises(DeliveryError, match="rejected"):
        echo(Peer("NOTTHENODE", "127.0.0.1", node.port, 5.0), "PACS")
    # And every rejection is in the audit trail
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = read_audit(node.config.node.audit_path)
        rejected = [
            r for r in records if r["event"] == "association" and r["outcome"] == "rejected"
        ]
        if len(rejected) >= 3:
            break
        time.sleep(0.05)
    assert {r["calling_ae"] for r in rejected} >= {"STRANGER", "OTHER"}


def tls_settings(pki: Pki, *, client: bool = False, require_client: bool = False) -> TlsSettings:
    cert, key = (pki.client_cert, pki.client_key) if client else (pki.server_cert, pki.server_key)
    return TlsSettings(
        enabled=not client,
        certificate=cert,
        private_key=key,
        ca_certificates=pki.ca,
        require_client_certificate=require_client,
    )


def test_tls_store_with_client_certificate_and_refusals(
    node_factory: NodeFactory, started: list[Node], pki: Pki, phantom_files: list[Path]
) -> None:
    # Given a TLS node requiring client certificates from the test CA
    node = start_with(node_factory, started, tls=tls_settings(pki, require_client=True))
    good = client_context(tls_settings(pki, client=True))
    # When a client with a certificate from the CA sends a study, it is stored
    results = send_files(
        Peer("DICOMNODE", "127.0.0.1", node.port, 10.0, good), phantom_files[:3], "PACS"
    )
    assert [r.status for r in results] == [0, 0, 0]
    # Then a client without a certificate, one from another CA, and plain TCP all fail
    anonymous = client_context(
        dataclasses.replace(tls_settings(pki, client=True), certificate=None, private_key=None)
    )
    rogue = client_context(
        TlsSettings(certificate=pki.rogue_cert, private_key=pki.rogue_key, ca_certificates=pki.ca)
    )
    for context in (anonymous, rogue, None):
        with pytest.raises(DeliveryError):
            echo(Peer("DICOMNODE", "127.0.0.1", node.port, 5.0, context), "PACS")
    assert echo(Peer("DICOMNODE", "127.0.0.1", node.port, 5.0, good), "PACS") == 0
    assert good.minimum_version.name == "TLSv1_2"


def test_scu_refuses_a_server_whose_certificate_is_not_from_the_ca(
    node_factory: NodeFactory, started: list[Node], pki: Pki
) -> None:
    node = start_with(
        node_factory,
        started,
        tls=TlsSettings(enabled=True, certificate=pki.rogue_cert, private_key=pki.rogue_key),
    )
    context = client_context(tls_settings(pki, client=True))
    with pytest.raises(DeliveryError):
        echo(Peer("DICOMNODE", "127.0.0.1", node.port, 5.0, context), "PACS")


def test_dcmtk_storescu_sends_over_tls(
    node_factory: NodeFactory,
    started: list[Node],
    pki: Pki,
    phantom_files: list[Path],
    require_tool: Callable[[str], str],
) -> None:
    storescu = require_tool("storescu")
    node = start_with(node_factory, started, tls=tls_settings(pki, require_client=True))
    proc = subprocess.run(
        [
            storescu,
            "+tls",
            str(pki.client_key),
            str(pki.client_cert),
            "+cf",
            str(pki.ca),
            "-aec",
            "DICOMNODE",
            "-aet",
            "PACS",
            "127.0.0.1",
            str(node.port),
            *map(str, phantom_files[:4]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert node.scp.counters.stored == 4


def test_results_are_delivered_over_tls_to_dcmtk_storescp(
    node_factory: NodeFactory,
    started: list[Node],
    pki: Pki,
    phantom_files: list[Path],
    require_tool: Callable[[str], str],
    tmp_path: Path,
    free_port: Callable[[], int],
) -> None:
    storescp = require_tool("storescp")
    port = free_port()
    out = tmp_path / "tls-pacs"
    out.mkdir()
    proc = subprocess.Popen(
        [
            storescp,
            "+tls",
            str(pki.server_key),
            str(pki.server_cert),
            "+cf",
            str(pki.ca),
            "-aet",
            "PACS",
            "-od",
            str(out),
            str(port),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = node_factory(start=False, pacs_port=port).config
        remotes = tuple(dataclasses.replace(r, tls=True) for r in base.remotes)
        node_settings = dataclasses.replace(
            base.node,
            tls=TlsSettings(
                certificate=pki.client_cert, private_key=pki.client_key, ca_certificates=pki.ca
            ),
        )
        node = Node(dataclasses.replace(base, node=node_settings, remotes=remotes))
        node.start()
        started.append(node)
        assert all(
            r.ok
            for r in send_files(Peer("DICOMNODE", "127.0.0.1", node.port), phantom_files, "PACS")
        )
        deadline = time.monotonic() + 90
        while len(list(out.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list(out.iterdir())) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_audit_trail_has_every_step_and_no_phi(
    node_factory: NodeFactory,
    folder_scp: FolderSCP,
    phantom: Phantom,
    phantom_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node = node_factory(pacs_port=folder_scp.port)
    assert all(
        r.ok for r in send_files(Peer("DICOMNODE", "127.0.0.1", node.port), phantom_files, "PACS")
    )
    assert len(folder_scp.wait_for(2, timeout=60)) == 2
    deadline = time.monotonic() + 10
    while node.jobs.counts() != {"done": 1} and time.monotonic() < deadline:
        time.sleep(0.05)
    records = read_audit(node.config.node.audit_path)
    events = {(r["event"], r.get("outcome") or r.get("state")) for r in records}
    assert {
        ("association", "accepted"),
        ("association", "released"),
        ("instance", "stored"),
        ("study", "complete"),
        ("job", "running"),
        ("job", "sending"),
        ("delivery", "sent"),
    } <= events
    stored = [r for r in records if r["event"] == "instance" and r["outcome"] == "stored"]
    assert len(stored) == len(phantom_files)
    assert all({"ts", "calling_ae", "host", "sop_instance_uid"} <= r.keys() for r in stored)
    text = node.config.node.audit_path.read_text() + caplog.text
    ds = phantom.datasets[0]
    for phi in (str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)):
        assert phi not in text


def test_retention_purges_delivered_studies_only(
    node_factory: NodeFactory,
    folder_scp: FolderSCP,
    phantom_files: list[Path],
    started: list[Node],
) -> None:
    base = node_factory(start=False, pacs_port=folder_scp.port).config
    config: Config = dataclasses.replace(
        base, node=dataclasses.replace(base.node, retention_days=1.0)
    )
    node = Node(config)
    node.start()
    started.append(node)
    assert all(
        r.ok for r in send_files(Peer("DICOMNODE", "127.0.0.1", node.port), phantom_files, "PACS")
    )
    folder_scp.wait_for(2, timeout=60)
    deadline = time.monotonic() + 10
    while node.jobs.counts() != {"done": 1} and time.monotonic() < deadline:
        time.sleep(0.05)
    study_dir = next((config.node.data_dir / "spool").iterdir())
    # Not yet: the study is younger than the retention period
    assert node.purge_expired(now=time.time() + 3600) == []
    assert study_dir.exists()
    # After it: files, index rows and results are gone, and the purge is audited
    (purged,) = node.purge_expired(now=time.time() + 2 * 86400)
    assert not study_dir.exists()
    assert node.index.latest_instances(purged) == []
    assert any(r["event"] == "purge" for r in read_audit(config.node.audit_path))
