"""The node's configuration: one TOML file loaded into typed, validated objects.

Everything is validated before anything binds a port; every error names the key
(``routes[0].match[1].SliceThickness``).  Relative paths are resolved against the folder of
the config file.  Bundle paths of the form ``builtin:NAME`` point at the bundles shipped in
``dicomnode.models`` (``models/bundles/NAME``).  The keys are documented in
``docs/configuration.md``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dicomnode.errors import ConfigError
from dicomnode.routing.rules import SeriesRule, parse_rule

SENDER = "@sender"
_AE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.+")


@dataclass(frozen=True)
class AllowedCaller:
    ae_title: str
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS (PS3.15 B.1): server certificate, optional client verification."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "DICOMNODE"
    bind_address: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 8
    max_pdu: int = 131072
    network_timeout_s: float = 60.0
    data_dir: Path = Path("var/dicomnode")
    min_free_disk_mb: int = 500
    workers: int = 1
    log_level: str = "INFO"
    require_called_ae: bool = True
    allowed_callers: tuple[AllowedCaller, ...] = ()
    audit_log: Path | None = None
    retention_days: float = 0.0
    tls: TlsSettings = field(default_factory=TlsSettings)

    @property
    def audit_path(self) -> Path:
        return self.audit_log if self.audit_log is not None else self.data_dir / "audit.jsonl"


@dataclass(frozen=True)
class CompletenessSettings:
    quiet_period_s: float = 30.0
    late_arrivals: Literal["rerun", "ignore"] = "rerun"
    poll_interval_s: float = 0.5


@dataclass(frozen=True)
class RetrySettings:
    max_attempts: int = 5
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 300.0

    def delay(self, attempt: int) -> float:
        """Back-off before attempt ``attempt + 1`` (attempt counts from 1)."""
        return float(min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class Remote:
    """A DICOM peer the node may send to (and accept the sender role from)."""

    name: str
    ae_title: str
    host: str
    port: int
    timeout_s: float = 30.0
    tls: bool = False


@dataclass(frozen=True)
class FolderDestination:
    name: str
    path: Path


@dataclass(frozen=True)
class PipelineSettings:
    name: str
    segmentation: Path
    classification: Path | None = None
    batch_size: int = 16
    providers: tuple[str, ...] = ("cuda", "cpu")
    tensorrt: bool = False


@dataclass(frozen=True)
class Route:
    name: str
    pipeline: str
    destinations: tuple[str, ...]
    rule: SeriesRule


@dataclass(frozen=True)
class Config:
    node: NodeSettings = field(default_factory=NodeSettings)
    completeness: CompletenessSettings = field(default_factory=CompletenessSettings)
    jobs: RetrySettings = field(default_factory=RetrySettings)
    delivery: RetrySettings = field(
        default_factory=lambda: RetrySettings(max_attempts=10, backoff_initial_s=2.0)
    )
    remotes: tuple[Remote, ...] = ()
    folders: tuple[FolderDestination, ...] = ()
    pipelines: tuple[PipelineSettings, ...] = ()
    routes: tuple[Route, ...] = ()
    source: Path | None = None

    def remote_by_ae(self, ae_title: str) -> Remote | None:
        return next((r for r in self.remotes if r.ae_title == ae_title), None)

    def remote_by_name(self, name: str) -> Remote | None:
        return next((r for r in self.remotes if r.name == name), None)

    def folder_by_name(self, name: str) -> FolderDestination | None:
        return next((f for f in self.folders if f.name == name), None)

    def pipeline(self, name: str) -> PipelineSettings:
        for p in self.pipelines:
            if p.name == name:
                return p
        raise ConfigError(f"no pipeline named {name!r}")


# --- small typed readers ------------------------------------------------------------


class _Table:
    """A TOML table being read: tracks the keys used and rejects the rest."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"'{where}' must be a table")
        self.data: dict[str, Any] = data
        self.where = where
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"'{self.key(name)}' must be {_kind_names(kinds)}, not a boolean")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            raise ConfigError(
                f"'{self.key(name)}' must be {_kind_names(kinds)}, not {type(value).__name__}"
            )
        return value

    def require(self, name: str, kind: type | tuple[type, ...]) -> Any:
        if name not in self.data:
            raise ConfigError(f"'{self.key(name)}' is required")
        return self.get(name, kind, None)

    def positive(self, name: str, kind: type, default: Any, *, allow_zero: bool = False) -> Any:
        value = self.get(name, kind, default)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"'{self.key(name)}' must be {'>= 0' if allow_zero else '> 0'}")
        return value

    def table(self, name: str) -> _Table:
        self.used.add(name)
        return _Table(self.data.get(name, {}), self.key(name))

    def tables(self, name: str) -> list[_Table]:
        self.used.add(name)
        items = self.data.get(name, [])
        if not isinstance(items, list):
            raise ConfigError(f"'{self.key(name)}' must be an array of tables ([[{name}]])")
        return [_Table(t, f"{self.key(name)}[{i}]") for i, t in enumerate(items)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"unknown key '{self.key(unknown[0])}'")


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _ae_title(value: str, where: str) -> str:
    if not value.strip() or len(value) > 16 or not set(value) <= _AE_CHARS or "\\" in value:
        raise ConfigError(f"'{where}' is not a valid AE title (1-16 characters, no backslash)")
    return value.strip()


def _port(value: int, where: str, *, allow_zero: bool = False) -> int:
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise ConfigError(f"'{where}' must be a TCP port (1-65535)")
    return value


def _path(value: str, base: Path) -> Path:
    if value.startswith("builtin:"):
        return builtin_bundle(value.removeprefix("builtin:"))
    p = Path(os.path.expandvars(os.path.expanduser(value)))
    return p if p.is_absolute() else (base / p)


def builtin_bundle(name: str) -> Path:
    """Path of a bundle shipped with the package (``models/bundles/NAME``)."""
    import dicomnode.models as shipped

    return Path(shipped.__file__).parent / "bundles" / name


# --- sections -----------------------------------------------------------------------


def _node(t: _Table, base: Path) -> NodeSettings:
    d = NodeSettings()
    callers = []
    for c in t.tables("allowed_callers"):
        title = _ae_title(c.require("ae_title", str), c.key("ae_title"))
        hosts = c.get("hosts", list, [])
        if not all(isinstance(h, str) for h in hosts):
            raise ConfigError(f"'{c.key('hosts')}' must be an array of strings")
        c.done()
        callers.append(AllowedCaller(title, tuple(hosts)))
    level = t.get("log_level", str, d.log_level).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"'{t.key('log_level')}' must be DEBUG, INFO, WARNING or ERROR")
    audit = t.get("audit_log", str, None)
    max_pdu = t.positive("max_pdu", int, d.max_pdu, allow_zero=True)
    if max_pdu and max_pdu < 4096:
        raise ConfigError(f"'{t.key('max_pdu')}' must be 0 (unlimited) or >= 4096")
    node = NodeSettings(
        ae_title=_ae_title(t.get("ae_title", str, d.ae_title), t.key("ae_title")),
        bind_address=t.get("bind_address", str, d.bind_address),
        port=_port(t.get("port", int, d.port), t.key("port"), allow_zero=True),
        max_associations=t.positive("max_associations", int, d.max_associations),
        max_pdu=max_pdu,
        network_timeout_s=t.positive("network_timeout_s", float, d.network_timeout_s),
        data_dir=_path(t.get("data_dir", str, str(d.data_dir)), base),
        min_free_disk_mb=t.positive("min_free_disk_mb", int, d.min_free_disk_mb, allow_zero=True),
        workers=t.positive("workers", int, d.workers, allow_zero=True),
        log_level=level,
        require_called_ae=t.get("require_called_ae", bool, d.require_called_ae),
        allowed_callers=tuple(callers),
        audit_log=None if audit is None else _path(audit, base),
        retention_days=t.positive("retention_days", float, 0.0, allow_zero=True),
        tls=_tls(t.table("tls"), base),
    )
    t.done()
    return node


def _tls(t: _Table, base: Path) -> TlsSettings:
    def path(name: str) -> Path | None:
        value = t.get(name, str, None)
        if value is None:
            return None
        p = _path(value, base)
        if not p.is_file():
            raise ConfigError(f"'{t.key(name)}': {p} does not exist")
        return p

    version = t.get("min_version", str, "1.2")
    if version not in ("1.2", "1.3"):
        raise ConfigError(f'\'{t.key("min_version")}\' must be "1.2" or "1.3"')
    tls = TlsSettings(
        enabled=t.get("enabled", bool, False),
        certificate=path("certificate"),
        private_key=path("private_key"),
        ca_certificates=path("ca_certificates"),
        require_client_certificate=t.get("require_client_certificate", bool, False),
        min_version=version,
    )
    t.done()
    if tls.enabled and (tls.certificate is None or tls.private_key is None):
        raise ConfigError(f"'{t.key('enabled')}' needs certificate and private_key")
    if tls.require_client_certificate and tls.ca_certificates is None:
        raise ConfigError(f"'{t.key('require_client_certificate')}' needs ca_certificates")
    return tls


def _completeness(t: _Table) -> CompletenessSettings:
    d = CompletenessSettings()
    late = t.get("late_arrivals", str, d.late_arrivals)
    if late not in ("rerun", "ignore"):
        raise ConfigError(f"'{t.key('late_arrivals')}' must be 'rerun' or 'ignore'")
    c = CompletenessSettings(
        quiet_period_s=t.positive("quiet_period_s", float, d.quiet_period_s),
        late_arrivals=late,
        poll_interval_s=t.positive("poll_interval_s", float, d.poll_interval_s),
    )
    t.done()
    return c


def _retry(t: _Table, d: RetrySettings) -> RetrySettings:
    r = RetrySettings(
        max_attempts=t.positive("max_attempts", int, d.max_attempts),
        backoff_initial_s=t.positive("backoff_initial_s", float, d.backoff_initial_s),
        backoff_max_s=t.positive("backoff_max_s", float, d.backoff_max_s),
    )
    t.done()
    return r


def _remote(t: _Table) -> Remote:
    title = _ae_title(t.require("ae_title", str), t.key("ae_title"))
    r = Remote(
        name=t.get("name", str, title),
        ae_title=title,
        host=t.require("host", str),
        port=_port(t.require("port", int), t.key("port")),
        timeout_s=t.positive("timeout_s", float, 30.0),
        tls=t.get("tls", bool, False),
    )
    t.done()
    return r


def _pipeline(t: _Table, base: Path) -> PipelineSettings:
    cls = t.get("classification", str, None)
    providers = t.get("providers", list, ["cuda", "cpu"])
    for p in providers:
        if p not in ("tensorrt", "cuda", "cpu"):
            raise ConfigError(f"'{t.key('providers')}' entries must be tensorrt, cuda or cpu")
    p = PipelineSettings(
        name=t.require("name", str),
        segmentation=_path(t.require("segmentation", str), base),
        classification=None if cls is None else _path(cls, base),
        batch_size=t.positive("batch_size", int, 16),
        providers=tuple(providers),
        tensorrt=t.get("tensorrt", bool, False),
    )
    t.done()
    return p


def _route(t: _Table) -> Route:
    name = t.require("name", str)
    matches = t.tables("match")
    rule = parse_rule([m.data for m in matches], where=t.key("match"))
    dests = t.require("destinations", list)
    if not dests or not all(isinstance(d, str) for d in dests):
        raise ConfigError(f"'{t.key('destinations')}' must be a non-empty array of names")
    r = Route(name=name, pipeline=t.require("pipeline", str), destinations=tuple(dests), rule=rule)
    t.done()
    return r


def parse_config(data: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    top = _Table(data, "")
    defaults = Config()
    cfg = Config(
        node=_node(top.table("node"), base),
        completeness=_completeness(top.table("completeness")),
        jobs=_retry(top.table("jobs"), defaults.jobs),
        delivery=_retry(top.table("delivery"), defaults.delivery),
        remotes=tuple(_remote(t) for t in top.tables("remotes")),
        folders=tuple(
            FolderDestination(t.require("name", str), _path(t.require("path", str), base))
            for t in top.tables("folders")
        ),
        pipelines=tuple(_pipeline(t, base) for t in top.tables("pipelines")),
        routes=tuple(_route(t) for t in top.tables("routes")),
        source=source,
    )
    top.done()
    for i, t in enumerate(data.get("folders", [])):
        extra = sorted(set(t) - {"name", "path"})
        if extra:
            raise ConfigError(f"unknown key 'folders[{i}].{extra[0]}'")
    _check_references(cfg)
    return cfg


def _check_references(cfg: Config) -> None:
    names = [r.name for r in cfg.remotes] + [f.name for f in cfg.folders]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"destination name {sorted(dupes)[0]!r} is defined twice")
    pipelines = {p.name for p in cfg.pipelines}
    for i, remote in enumerate(cfg.remotes):
        if remote.tls and cfg.node.tls.ca_certificates is None:
            raise ConfigError(
                f"'remotes[{i}].tls' needs [node.tls].ca_certificates to verify the peer"
            )
    for i, route in enumerate(cfg.routes):
        if route.pipeline not in pipelines:
            raise ConfigError(f"'routes[{i}].pipeline' names unknown pipeline {route.pipeline!r}")
        for d in route.destinations:
            if d != SENDER and d not in names:
                raise ConfigError(
                    f"'routes[{i}].destinations' names unknown destination {d!r} "
                    f"(define it in [[remotes]] or [[folders]], or use '{SENDER}')"
                )


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a TOML config file; ``overrides`` patch ``[node]`` keys."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    if overrides:
        data.setdefault("node", {}).update(overrides)
    return parse_config(data, path.resolve().parent, source=path)


def default_config_path() -> Path:
    """The embedded default configuration (used by the demo and when no file is given)."""
    return Path(__file__).parent / "defaults" / "node.toml"
