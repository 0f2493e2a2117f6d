"""The node's configuration: one TOML file loaded into one typed, validated object.

The schema is the classes below (pydantic dataclasses, :mod:`dicomnode.schema`): types,
ranges and defaults are declared once, here.  Everything is validated before anything
binds a port and every error is reported at once, each naming its key
(``routes[0].match[1].SliceThickness``), unknown keys with the closest known one.
References between sections (routes -> pipelines, destinations) are checked once the
sections themselves are valid.  Relative paths are resolved against the folder of the
config file; ``builtin:NAME`` names a bundle shipped in ``dicomnode.models``
(``models/bundles/NAME``).  Keys are documented in ``docs/configuration.md``; the JSON
Schema is ``docs/config.schema.json`` (``dicomnode schema config``).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.dataclasses import dataclass

from dicomnode.errors import ConfigError
from dicomnode.routing.rules import SeriesRule, parse_rule
from dicomnode.schema import STRICT, json_schema, key_error, validate_document

SENDER = "@sender"
_AE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.+")


# --- field types ---------------------------------------------------------------------


def _ae_title(value: str) -> str:
    if not value.strip() or len(value) > 16 or not set(value) <= _AE_CHARS:
        raise ValueError("not a valid AE title (1-16 characters: letters, digits, space _-.+)")
    return value.strip()


def builtin_bundle(name: str) -> Path:
    """Path of a bundle shipped with the package (``models/bundles/NAME``)."""
    import dicomnode.models as shipped

    return Path(shipped.__file__).parent / "bundles" / name


def _path(value: Any, info: ValidationInfo) -> Any:
    """``builtin:NAME``, ``~`` and ``$VARS`` expanded; relative to the config file's folder."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        return value  # the type check reports it
    if value.startswith("builtin:"):
        return str(builtin_bundle(value.removeprefix("builtin:")))
    p = Path(os.path.expandvars(os.path.expanduser(value)))
    base = (info.context or {}).get("base")
    return str(p if p.is_absolute() or base is None else Path(base) / p)


AeTitle = Annotated[str, AfterValidator(_ae_title), Field(min_length=1, max_length=16)]
ConfigPath = Annotated[Path, BeforeValidator(_path)]
Port = Annotated[int, Field(ge=1, le=65535)]
Positive = Annotated[float, Field(gt=0)]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
NonNegative = Annotated[float, Field(ge=0)]


def _rule(value: Any) -> SeriesRule:
    if isinstance(value, SeriesRule):
        return value
    try:
        return parse_rule(value, where="match")
    except ConfigError as exc:
        raise key_error(str(exc)) from None


_RULE_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "description": "Alternatives (OR) of tables of conditions (AND) keyed by DICOM keyword "
    "or instance_count; see docs/configuration.md.",
    "items": {"type": "object"},
}
Rule = Annotated[SeriesRule, PlainValidator(_rule), WithJsonSchema(_RULE_SCHEMA)]


# --- sections ------------------------------------------------------------------------


@dataclass(frozen=True, config=STRICT)
class AllowedCaller:
    ae_title: AeTitle
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True, config=STRICT)
class TlsSettings:
    """DICOM TLS (PS3.15 B.1): server certificate, optional client verification."""

    enabled: bool = False
    certificate: ConfigPath | None = None
    private_key: ConfigPath | None = None
    ca_certificates: ConfigPath | None = None
    require_client_certificate: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        for name in ("certificate", "private_key", "ca_certificates"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} does not exist")
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("enabled needs certificate and private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        return self


@dataclass(frozen=True, config=STRICT)
class NodeSettings:
    ae_title: AeTitle = "DICOMNODE"
    bind_address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112
    max_associations: Annotated[
        int,
        Field(ge=1, description="open at once on the node's port, all receivers together"),
    ] = 8
    max_pdu: Annotated[int, Field(ge=0, description="0: unlimited, else >= 4096")] = 131072
    network_timeout_s: Positive = 60.0
    data_dir: ConfigPath = Path("var/dicomnode")
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 500
    workers: Annotated[int, Field(ge=0)] = 1
    log_level: LogLevel = "INFO"
    require_called_ae: bool = True
    allowed_callers: tuple[AllowedCaller, ...] = ()
    audit_log: ConfigPath | None = None
    retention_days: NonNegative = 0.0
    tls: TlsSettings = field(default_factory=TlsSettings)
    fast_receive: Annotated[
        bool,
        Field(
            description="serve plain storage associations with the node's own upper layer "
            "(net/ul.py); false: pynetdicom serves every association"
        ),
    ] = True
    max_instance_mb: Annotated[
        int, Field(ge=1, description="larger instances are refused with 0xA700")
    ] = 1024
    receive_in_memory_mb: Annotated[
        int,
        Field(
            ge=1,
            description="instances up to this size are received in memory and acknowledged "
            "once in the receive log; larger ones are received into a file as they arrive "
            "and stored durably before the answer",
        ),
    ] = 16
    receivers: Annotated[
        int,
        Field(
            ge=1,
            le=64,
            description="processes receiving on the port (SO_REUSEPORT), sharing spool and index",
        ),
    ] = 1
    worker_backend: Annotated[
        Literal["local", "ray"],
        Field(
            description="where jobs run: local worker processes, or actors on the Ray cluster "
            "of [ray] (docs/scale-out.md)"
        ),
    ] = "local"

    @model_validator(mode="after")
    def _pdu(self) -> NodeSettings:
        if 0 < self.max_pdu < 4096:
            raise ValueError("max_pdu must be 0 (unlimited) or >= 4096")
        return self

    @property
    def audit_path(self) -> Path:
        return self.audit_log if self.audit_log is not None else self.data_dir / "audit.jsonl"


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, config=STRICT)
class HttpSettings:
    """The node's HTTP port: health, readiness, metrics (and DICOMweb, pages as they land).

    It listens on 127.0.0.1 unless told otherwise; bound to another address it requires
    ``token`` (sent as ``Authorization: Bearer ...``), because its pages show patient data.
    ``token`` may name an environment variable: ``"${DICOMNODE_HTTP_TOKEN}"``."""

    enabled: bool = False
    bind_address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    token: str = ""

    @model_validator(mode="after")
    def _access(self) -> HttpSettings:
        token = os.path.expandvars(self.token)
        if "$" in token:
            raise ValueError(f"token names an environment variable that is not set: {self.token}")
        object.__setattr__(self, "token", token)
        if self.enabled and self.bind_address not in _LOOPBACK and not token:
            raise ValueError(
                f"bind_address {self.bind_address!r} is not loopback: set token "
                "(these pages show patient data)"
            )
        return self


@dataclass(frozen=True, config=STRICT)
class CompletenessSettings:
    """When a study is complete: ``quiet_period_s`` without new instances, or as soon as
    the node holds every instance its sender counts (``ask_sender``)."""

    quiet_period_s: Positive = 30.0
    late_arrivals: Literal["rerun", "ignore"] = "rerun"
    poll_interval_s: Positive = 0.5
    ask_sender: Annotated[
        bool,
        Field(
            description="ask a sender that is a configured remote how many instances the "
            "study holds (C-FIND) and complete the study once they are all in"
        ),
    ] = True
    lull_s: Annotated[
        float,
        Field(gt=0, description="a pause in arrivals after which the sender is asked again"),
    ] = 2.0


@dataclass(frozen=True, config=STRICT)
class RetrySettings:
    max_attempts: Annotated[int, Field(ge=1)] = 5
    backoff_initial_s: Positive = 2.0
    backoff_max_s: Positive = 300.0

    def delay(self, attempt: int) -> float:
        """Back-off before attempt ``attempt + 1`` (attempt counts from 1)."""
        return float(min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, attempt - 1)))


def _name_optional(schema: dict[str, Any]) -> None:
    schema["required"] = [k for k in schema.get("required", []) if k != "name"]


@dataclass(frozen=True, config=ConfigDict(**STRICT, json_schema_extra=_name_optional))
class Remote:
    """A DICOM peer the node may send to (and accept the sender role from).  ``name``
    defaults to the AE title."""

    name: str
    ae_title: AeTitle
    host: str
    port: Port
    timeout_s: Positive = 30.0
    tls: bool = False

    @model_validator(mode="before")
    @classmethod
    def _name_defaults_to_ae_title(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" not in data and isinstance(data.get("ae_title"), str):
            return {**data, "name": data["ae_title"]}
        return data


@dataclass(frozen=True, config=STRICT)
class FolderDestination:
    name: str
    path: ConfigPath


@dataclass(frozen=True, config=STRICT)
class Bound:
    """A numeric range: any of ``ge``, ``gt``, ``le``, ``lt`` (all given must hold)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )


#: Triage priorities of a result, most pressing first (``routine``: no rule matched).
TRIAGE_PRIORITIES = ("urgent", "review", "routine")
TriagePriority = Literal["urgent", "review", "routine"]


@dataclass(frozen=True, config=STRICT)
class TriageCondition:
    """What must hold of one finding or one classification (all keys given, AND).

    ``finding`` names a segmentation label (``"*"``: any) and may bound its
    ``longest_diameter_mm``, ``volume_mm3`` and ``count`` (findings of that label);
    ``classification`` names a classifier label (``"*"``: any) and may bound its
    ``probability`` and require ``positive``."""

    finding: str | None = None
    longest_diameter_mm: Bound | None = None
    volume_mm3: Bound | None = None
    count: Bound | None = None
    classification: str | None = None
    probability: Bound | None = None
    positive: bool | None = None

    @model_validator(mode="after")
    def _one_subject(self) -> TriageCondition:
        if (self.finding is None) == (self.classification is None):
            raise ValueError("name exactly one of finding or classification")
        if self.finding is not None and (self.probability or self.positive is not None):
            raise ValueError("probability and positive apply to a classification")
        sizes = (self.longest_diameter_mm, self.volume_mm3, self.count)
        if self.classification is not None and any(b is not None for b in sizes):
            raise ValueError("longest_diameter_mm, volume_mm3 and count apply to a finding")
        return self


@dataclass(frozen=True, config=STRICT)
class TriageRule:
    """``priority`` when ``when`` holds; a result takes the most pressing matching rule."""

    priority: Literal["urgent", "review"]
    when: TriageCondition


@dataclass(frozen=True, config=STRICT)
class PipelineSettings:
    """A named pipeline: its kind (a registered implementation) and its model bundles by
    role (``segmentation``, ``classification``, ... as the kind declares)."""

    name: str
    bundles: dict[str, ConfigPath]
    kind: str = "lesion"
    batch_size: Annotated[int, Field(ge=1)] = 16
    providers: tuple[Literal["tensorrt", "cuda", "cpu"], ...] = ("cuda", "cpu")
    tensorrt: bool = False
    triage: tuple[TriageRule, ...] = ()
    #: Leave the empty frames out of the SEG (outputs/seg.py says when that is safe).
    omit_empty_frames: bool = False
    #: On the CPU, run segmentation models on the body's bounding box only, not on the
    #: air around it (inference/runner.py; a third less work on a chest CT).
    crop_to_body: bool = True
    #: Return an explanation map per explained label as a Parametric Map (the kind must
    #: make them: ``lesion`` does, from its segmentation model's probabilities).
    heat_maps: bool = False
    #: Return a Key Object Selection with the key image of each finding (its largest
    #: cross-section), listed in the SR.
    key_images: bool = False


#: Request priorities of a study, most pressing first (DICOM Requested Procedure Priority).
REQUEST_PRIORITIES = ("STAT", "HIGH", "ROUTINE")
RequestPriority = Literal["STAT", "HIGH", "ROUTINE"]


@dataclass(frozen=True, config=STRICT)
class Route:
    name: str
    pipeline: str
    destinations: Annotated[tuple[str, ...], Field(min_length=1)]
    match: Rule
    #: The least priority of the route's jobs (a study's request may raise it).
    priority: RequestPriority = "ROUTINE"

    @property
    def rule(self) -> SeriesRule:
        return self.match


@dataclass(frozen=True, config=STRICT)
class PrioritySettings:
    """Claim order of queued jobs: priority, then age; ``aging_s`` is the wait that is
    worth one priority step (a routine job queued ``2 * aging_s`` ago goes before a STAT
    job that has just arrived: nothing starves)."""

    aging_s: Positive = 600.0


@dataclass(frozen=True, config=STRICT)
class Hl7Destination:
    """An HL7 v2 receiver (RIS, worklist): ORU^R01 result messages over MLLP."""

    name: str
    host: str
    port: Port
    timeout_s: Positive = 30.0
    sending_application: Annotated[str, Field(min_length=1, max_length=227)] = "DICOMNODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""


@dataclass(frozen=True, config=STRICT)
class RaySettings:
    """The Ray cluster of ``dicomnode batch --ray`` and of ``worker_backend = "ray"``, and
    what each actor (one study or job at a time, its model sessions loaded once) reserves
    there (docs/scale-out.md)."""

    address: Annotated[
        str,
        Field(
            description='"": a local Ray instance started for the run; "auto": the cluster '
            'this machine belongs to; "HOST:PORT": the head\'s GCS address'
        ),
    ] = ""
    actors: Annotated[int, Field(ge=1, le=4096, description="actors (parallel studies)")] = 2
    num_cpus: Annotated[float, Field(ge=0, description="CPU slots per actor")] = 1.0
    num_gpus: Annotated[
        float, Field(ge=0, description="GPU slots per actor (0.25: four share one)")
    ] = 0.0
    memory_mb: Annotated[int, Field(ge=0, description="memory reserved per actor (0: none)")] = 0


def _default_delivery() -> RetrySettings:
    return RetrySettings(max_attempts=10, backoff_initial_s=2.0)


@dataclass(frozen=True, config=STRICT)
class Config:
    node: NodeSettings = field(default_factory=NodeSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    completeness: CompletenessSettings = field(default_factory=CompletenessSettings)
    jobs: RetrySettings = field(default_factory=RetrySettings)
    delivery: RetrySettings = field(default_factory=_default_delivery)
    remotes: tuple[Remote, ...] = ()
    folders: tuple[FolderDestination, ...] = ()
    hl7: tuple[Hl7Destination, ...] = ()
    priority: PrioritySettings = field(default_factory=PrioritySettings)
    ray: RaySettings = field(default_factory=RaySettings)
    pipelines: tuple[PipelineSettings, ...] = ()
    routes: tuple[Route, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> Config:
        errors = reference_errors(self)
        if errors:
            raise key_error("\n".join(errors))
        return self

    @cached_property
    def source(self) -> Path | None:
        """The file this configuration was loaded from (set by :func:`load_config`)."""
        return None

    def remote_by_ae(self, ae_title: str) -> Remote | None:
        return next((r for r in self.remotes if r.ae_title == ae_title), None)

    def remote_by_name(self, name: str) -> Remote | None:
        return next((r for r in self.remotes if r.name == name), None)

    def folder_by_name(self, name: str) -> FolderDestination | None:
        return next((f for f in self.folders if f.name == name), None)

    def hl7_by_name(self, name: str) -> Hl7Destination | None:
        return next((h for h in self.hl7 if h.name == name), None)

    def pipeline(self, name: str) -> PipelineSettings:
        for p in self.pipelines:
            if p.name == name:
                return p
        raise ConfigError(f"no pipeline named {name!r}")


def reference_errors(cfg: Config) -> list[str]:
    """Names that must resolve between sections, each error starting with its key."""
    errors = []
    names = [r.name for r in cfg.remotes] + [f.name for f in cfg.folders]
    names += [h.name for h in cfg.hl7]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"'remotes/folders/hl7' define the destination name {name!r} twice")
    for kind, items in (("pipelines", cfg.pipelines), ("routes", cfg.routes)):
        seen = [i.name for i in items]
        for name in sorted({n for n in seen if seen.count(n) > 1}):
            errors.append(f"'{kind}' define the name {name!r} twice")
    pipelines = {p.name for p in cfg.pipelines}
    for i, remote in enumerate(cfg.remotes):
        if remote.tls and cfg.node.tls.ca_certificates is None:
            errors.append(f"'remotes[{i}].tls' needs [node.tls].ca_certificates to verify the peer")
    for i, route in enumerate(cfg.routes):
        if route.pipeline not in pipelines:
            errors.append(
                f"'routes[{i}].pipeline' names unknown pipeline {route.pipeline!r} "
                f"(defined: {', '.join(sorted(pipelines)) or 'none'})"
            )
        for d in route.destinations:
            if d != SENDER and d not in names:
                errors.append(
                    f"'routes[{i}].destinations' names unknown destination {d!r} "
                    f"(define it in [[remotes]], [[folders]] or [[hl7]], or use '{SENDER}')"
                )
    return errors


def parse_config(data: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    """Validate a parsed TOML document into a :class:`Config` (all errors at once)."""
    what = f"configuration {source}" if source else "configuration"
    cfg = validate_document(Config, data, what=what, error=ConfigError, context={"base": base})
    if source is not None:
        cfg.__dict__["source"] = source  # the cached_property's slot
    return cfg


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


def config_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file (``docs/config.schema.json``)."""
    return json_schema(Config, "dicomnode node configuration")
