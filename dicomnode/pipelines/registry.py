"""Pipeline kinds by name, from Python entry points (group ``dicomnode.pipelines``).

dicomnode registers its own kinds (``lesion``, ``classification``) in its
``pyproject.toml``; a hospital adds one by installing a package that declares::

    [project.entry-points."dicomnode.pipelines"]
    my-kind = "my_package.my_module:KIND"

where ``KIND`` is a :class:`~dicomnode.pipelines.base.PipelineKind`.  No fork needed.

:func:`check_pipeline` validates a configured pipeline without creating any inference
session (the kind exists, every required bundle role is given and no unknown one, every
bundle loads with a matching sha256 and declares its role's task); the node runs it for
every pipeline before it binds a port.  :func:`build_pipeline` then opens the sessions.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Mapping
from importlib.metadata import entry_points

from dicomnode.config import PipelineSettings
from dicomnode.errors import ConfigError, DicomNodeError, ModelError
from dicomnode.inference.card import Bundle, load_bundle
from dicomnode.inference.runner import BundleRunner
from dicomnode.pipelines.base import ExplainingPipeline, Pipeline, PipelineKind, explains

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dicomnode.pipelines"


@functools.cache
def pipeline_kinds() -> Mapping[str, PipelineKind]:
    """Every installed pipeline kind by name (loaded once per process).

    A kind whose entry point cannot be imported, or does not provide ``roles``,
    ``emits_segmentation`` and ``build``, is an error naming the entry point."""
    kinds: dict[str, PipelineKind] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            kind = ep.load()
        except Exception as exc:
            raise ConfigError(
                f"pipeline kind {ep.name!r} ({ep.value}) cannot be loaded: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(kind, PipelineKind):
            raise ConfigError(
                f"pipeline kind {ep.name!r} ({ep.value}) is not a PipelineKind "
                "(it needs roles, emits_segmentation and build)"
            )
        kinds[ep.name] = kind
    return kinds


def get_kind(name: str) -> PipelineKind:
    kinds = pipeline_kinds()
    if name not in kinds:
        close = difflib.get_close_matches(name, kinds, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown pipeline kind {name!r} (installed: {', '.join(sorted(kinds))}){hint}"
        )
    return kinds[name]


def check_pipeline(settings: PipelineSettings) -> dict[str, Bundle]:
    """Validate a configured pipeline and load (hash-check) its bundles, without sessions.

    Raises :class:`ConfigError` listing every problem, each naming the pipeline, the
    bundle role and the path."""
    where = f"pipeline {settings.name!r}"
    try:
        kind = get_kind(settings.kind)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    errors: list[str] = []
    if settings.heat_maps and not explains(kind):
        errors.append(f"{where}: heat_maps = true, but kind {settings.kind!r} makes no heat maps")
    for role, required in kind.roles.items():
        if required.required and role not in settings.bundles:
            errors.append(f"{where}: bundles.{role} is required by kind {settings.kind!r}")
    bundles: dict[str, Bundle] = {}
    for role, path in settings.bundles.items():
        spec = kind.roles.get(role)
        if spec is None:
            known = ", ".join(kind.roles)
            errors.append(f"{where}: kind {settings.kind!r} has no bundle role {role!r} ({known})")
            continue
        try:
            bundle = load_bundle(path)
        except DicomNodeError as exc:
            errors.append(f"{where}: bundles.{role} = {path}: {exc}")
            continue
        if bundle.card.task != spec.task:
            errors.append(
                f"{where}: bundles.{role} = {path} is a {bundle.card.task} model; "
                f"the role needs a {spec.task} model"
            )
            continue
        bundles[role] = bundle
    if errors:
        error = ConfigError("\n".join(errors))
        error.errors = tuple(errors)
        raise error
    return bundles


def build_pipeline(settings: PipelineSettings) -> Pipeline:
    """Check a configured pipeline, open one ONNX Runtime session per bundle, build it."""
    bundles = check_pipeline(settings)
    runners = {
        role: BundleRunner(
            bundle,
            settings.providers,
            tensorrt=settings.tensorrt,
            batch_size=settings.batch_size,
            crop_to_body=settings.crop_to_body,
        )
        for role, bundle in bundles.items()
    }
    pipeline = get_kind(settings.kind).build(runners)
    if settings.heat_maps:
        if not isinstance(pipeline, ExplainingPipeline):
            raise ModelError(
                f"pipeline kind {settings.kind!r} says it explains, but its "
                f"{type(pipeline).__name__} has no with_heat_maps()"
            )
        pipeline = pipeline.with_heat_maps()
    if not isinstance(pipeline, Pipeline):
        raise ModelError(f"pipeline kind {settings.kind!r} built a {type(pipeline).__name__}")
    return pipeline


def emits_segmentation(settings: PipelineSettings) -> bool:
    return get_kind(settings.kind).emits_segmentation
