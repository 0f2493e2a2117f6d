"""One error tree for the whole node.

Every error the node raises on purpose derives from :class:`DicomNodeError`.  Errors that
may succeed when tried again later (a PACS that is down, a full disk) set
``transient = True``; the job queue and the outbox retry those with back-off and
dead-letter the rest at once.  The mapping to DICOM status codes lives in one place,
``dicomnode.net.status``.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base class of all errors raised by dicomnode.

    ``errors`` lists every problem when one error reports several (a document that fails
    validation), one line each."""

    transient: bool = False
    errors: tuple[str, ...] = ()


class ConfigError(DicomNodeError):
    """The configuration is invalid; the message names the offending key."""


class SpoolError(DicomNodeError):
    """An instance could not be stored or indexed."""


class OutOfResourcesError(SpoolError):
    """The data directory is below the free-space watermark."""

    transient = True


class InvalidInstanceError(SpoolError):
    """Received bytes are not a storable DICOM instance (malformed, no SOP Instance UID)."""


class RoutingError(DicomNodeError):
    """A routing rule is invalid or could not be evaluated."""


class ImagingError(DicomNodeError):
    """A series cannot be turned into a consistent volume (mixed sizes, gaps, duplicates)."""


class ModelError(DicomNodeError):
    """A model bundle is invalid (hash, card) or inference failed."""


class OutputError(DicomNodeError):
    """A SEG or SR object could not be built from the inputs given."""


class DeliveryError(DicomNodeError):
    """A result could not be delivered.

    ``transient`` is True when the destination may accept it later (connection refused,
    association rejected transiently, out of resources); False for a permanent rejection.
    """

    def __init__(self, message: str, *, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


class MissingExtraError(DicomNodeError):
    """An optional feature needs packages that are not installed."""

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(f"{feature} needs the '{extra}' extra: pip install 'dicomnode[{extra}]'")


class TransitionError(DicomNodeError):
    """A study, job or outbox item was asked to move along an edge its state machine lacks."""
