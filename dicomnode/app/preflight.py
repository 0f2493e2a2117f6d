"""Fail at start, not per study: everything a running node would trip over, checked first.

:func:`preflight` runs before the node binds its port (and in ``dicomnode check-config``):
every pipeline's kind, bundle roles, cards and model hashes
(:func:`dicomnode.pipelines.registry.check_pipeline`, no inference session opened); the
data directory and the audit log writable (a file is written, fsynced and removed); folder
destinations creatable and writable; remote and HL7 hosts resolvable.  Every problem is reported
at once; warnings (a data directory already below its free-space watermark) are returned.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.config import Config
from dicomnode.errors import ConfigError
from dicomnode.inference.card import Bundle
from dicomnode.pipelines.registry import check_pipeline


@dataclass
class PreflightReport:
    bundles: dict[str, dict[str, Bundle]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _writable(folder: Path, what: str) -> str | None:
    """None when a file can be created, fsynced and removed in ``folder`` (made if need be)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".dicomnode-preflight-{uuid.uuid4().hex}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        return f"{what} {folder} is not writable: {exc.strerror or exc}"
    return None


def preflight(config: Config, *, resolve_hosts: bool = True) -> PreflightReport:
    """Check a configuration against the machine; raise :class:`ConfigError` listing every
    problem (each naming the pipeline, path or destination)."""
    report = PreflightReport()
    errors: list[str] = []
    for pipeline in config.pipelines:
        try:
            report.bundles[pipeline.name] = check_pipeline(pipeline)
        except ConfigError as exc:
            errors.extend(exc.errors or (str(exc),))
    node = config.node
    for problem in (
        _writable(node.data_dir, "[node].data_dir"),
        None if node.audit_log is None else _writable(node.audit_log.parent, "[node].audit_log"),
        *(_writable(f.path, f"folder destination {f.name!r}:") for f in config.folders),
    ):
        if problem:
            errors.append(problem)
    if resolve_hosts:
        peers = [("remote", r.name, r.host, r.port) for r in config.remotes]
        peers += [("HL7 destination", h.name, h.host, h.port) for h in config.hl7]
        for kind, name, host, port in peers:
            try:
                socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                errors.append(f"{kind} {name!r}: host {host!r} does not resolve: {exc}")
    if not errors and node.data_dir.is_dir():
        free = shutil.disk_usage(node.data_dir).free
        if free < node.min_free_disk_mb * 2**20:
            report.warnings.append(
                f"[node].data_dir has {free // 2**20} MiB free, below min_free_disk_mb = "
                f"{node.min_free_disk_mb}: the node will answer C-STOREs with 0xA700"
            )
    if errors:
        where = f" ({config.source})" if config.source else ""
        error = ConfigError(
            f"the node cannot start{where}: {len(errors)} problem(s)\n  " + "\n  ".join(errors)
        )
        error.errors = tuple(errors)
        raise error
    return report
