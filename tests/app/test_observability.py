"""Metrics and log lines a PACS admin follows: real node, real sockets, the fixture models."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from multiprocessing import Pipe
from pathlib import Path

import pytest
from pynetdicom import AE

from dicomnode.app.metrics import METRIC_NAMES, NodeMetrics, PipeJobObserver
from dicomnode.app.node import Node
from dicomnode.config import HttpSettings
from dicomnode.jobs.store import DONE
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files


def wait_until(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def scrape(node: Node) -> str:
    assert node.http is not None
    url = f"http://127.0.0.1:{node.http.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def with_http(node: Node) -> Node:
    config = dataclasses.replace(node.config, http=HttpSettings(enabled=True, port=0))
    started = Node(config)
    started.start()
    return started


def test_metrics_cover_receiving_jobs_and_delivery(
    node_factory: Callable[..., Node],
    folder_scp: FolderSCP,
    phantom_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node = with_http(node_factory(pacs_port=folder_scp.port, start=False))
    try:
        results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), phantom_files, "PACS")
        assert all(r.ok for r in results)
        wait_until(lambda: any(j.state == DONE for j in node.jobs.list_jobs()))
        # The results are delivered from the outbox once the job is done: wait for that too
        delivered = 'dicomnode_job_phase_seconds_count{phase="delivery",pipeline="lesion"}'
        wait_until(lambda: delivered in scrape(node), timeout=30)
        text = scrape(node)
    finally:
        node.stop(timeout=30)
    n = len(phantom_files)
    assert f'dicomnode_received_instances_total{{calling_ae="PACS",outcome="stored"}} {n}.0' in text
    assert 'dicomnode_received_bytes_total{calling_ae="PACS",outcome="stored"}' in text
    assert f'dicomnode_c_store_responses_total{{status="0x0000"}} {n}.0' in text
    assert 'dicomnode_associations_total{calling_ae="PACS",outcome="released"} 1.0' in text
    for phase in ("load", "inference", "encoding", "delivery"):
        assert f'dicomnode_job_phase_seconds_count{{phase="{phase}",pipeline="lesion"}}' in text
    assert 'dicomnode_delivery_attempts_total{destination="pacs"}' in text
    assert 'provider="CPUExecutionProvider"' in text
    assert 'dicomnode_jobs{state="done"} 1.0' in text
    for name in METRIC_NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    # One line per association end, one per study state change, with the counts
    messages = [r.getMessage() for r in caplog.records]
    (assoc,) = [m for m in messages if m.startswith("association from PACS")]
    assert "released after" in assoc and f"{n} instance(s)" in assoc
    assert f"0x0000 x{n}" in assoc and "processed after 1 s without new instances" in assoc
    assert any("complete: 1 series" in m and "route ct -> pipeline lesion" in m for m in messages)
    assert any("processed in" in m and "inference" in m for m in messages)


def test_two_nodes_in_one_process_keep_their_own_metrics() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    a.instance("PACS", "stored", 100, 0)
    assert (
        a.registry.get_sample_value(
            "dicomnode_received_instances_total", {"calling_ae": "PACS", "outcome": "stored"}
        )
        == 1.0
    )
    assert (
        b.registry.get_sample_value(
            "dicomnode_received_instances_total", {"calling_ae": "PACS", "outcome": "stored"}
        )
        is None
    )


def test_worker_observations_travel_over_the_pipe() -> None:
    metrics = NodeMetrics()
    reader, writer = Pipe(duplex=False)
    stop = threading.Event()
    thread = threading.Thread(target=metrics.drain, args=(lambda: [reader], stop))
    thread.start()
    observer = PipeJobObserver(writer)
    observer.phase("lesion", "inference", 1.5)
    observer.provider("lesion", "seg", "CUDAExecutionProvider")
    observer.provider("lesion", "seg", "CPUExecutionProvider")  # fell back
    writer.close()

    def seen() -> bool:
        return (
            metrics.registry.get_sample_value(
                "dicomnode_execution_provider",
                {"pipeline": "lesion", "model": "seg", "provider": "CPUExecutionProvider"},
            )
            == 1.0
        )

    wait_until(seen, 10)
    stop.set()
    thread.join()
    labels = {"pipeline": "lesion", "phase": "inference"}
    assert metrics.registry.get_sample_value("dicomnode_job_phase_seconds_sum", labels) == 1.5
    assert (
        metrics.registry.get_sample_value(
            "dicomnode_execution_provider",
            {"pipeline": "lesion", "model": "seg", "provider": "CUDAExecutionProvider"},
        )
        is None
    )


def test_failed_delivery_logs_attempt_and_next_try_without_pynetdicom_errors(
    node_factory: Callable[..., Node],
    phantom_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node = node_factory()  # the PACS is down (discard port)
    results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), phantom_files, "PACS")
    assert all(r.ok for r in results)

    def attempted() -> bool:
        return any("attempt 2 of 50" in r.getMessage() for r in caplog.records)

    wait_until(attempted)
    lines = [r for r in caplog.records if "delivery of" in r.getMessage()]
    assert "attempt 1 of 50" in lines[0].getMessage()
    assert "next try at" in lines[0].getMessage() and lines[0].levelno == logging.WARNING
    assert not [
        r for r in caplog.records if r.name.startswith("pynetdicom") and r.levelno >= logging.ERROR
    ]
    assert node.metrics.registry.get_sample_value(
        "dicomnode_delivery_failures_total", {"destination": "pacs", "kind": "transient"}
    )


def test_a_rejected_association_says_why_and_audits_the_title_asked_for(
    node_factory: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    node = node_factory()
    ae = AE(ae_title="PACS")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="WRONGNODE")
    assert assoc.is_rejected

    def logged() -> bool:
        return any("rejected:" in r.getMessage() for r in caplog.records)

    wait_until(logged, 10)
    (line,) = [r.getMessage() for r in caplog.records if "rejected:" in r.getMessage()]
    assert "to WRONGNODE" in line and "called AE title 'WRONGNODE' is not this node's" in line
    audit = node.config.node.audit_path
    if audit is not None and audit.is_file():
        entries = [json.loads(x) for x in audit.read_text().splitlines()]
        rejected = [e for e in entries if e.get("outcome") == "rejected"]
        assert rejected and rejected[-1]["called_ae"] == "WRONGNODE"
    assert node.metrics.registry.get_sample_value(
        "dicomnode_associations_total", {"calling_ae": "PACS", "outcome": "rejected"}
    )
