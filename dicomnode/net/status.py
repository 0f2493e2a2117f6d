"""The one place where our errors become DICOM status codes (PS3.4 B.2.3, PS3.7 C)."""

from __future__ import annotations

import logging

from dicomnode.errors import InvalidInstanceError, OutOfResourcesError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
REFUSED_NOT_AUTHORIZED = 0x0124
REFUSED_OUT_OF_RESOURCES = 0xA700
ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
ERROR_CANNOT_UNDERSTAND = 0xC210
ERROR_UNEXPECTED = 0xC211
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})
TRANSIENT_FAILURES = frozenset({0xA700, 0xA701, 0xA702, 0xA7FF, 0x0213})


def status_for(exc: BaseException) -> int:
    """Map an exception raised while storing to the C-STORE status to answer."""
    if isinstance(exc, OutOfResourcesError):
        return REFUSED_OUT_OF_RESOURCES
    if isinstance(exc, InvalidInstanceError):
        return ERROR_CANNOT_UNDERSTAND
    return ERROR_UNEXPECTED


def is_success(status: int) -> bool:
    return status == SUCCESS or status in WARNING_STATUSES


def is_transient(status: int) -> bool:
    """Failures a destination may stop returning later (out of resources, busy)."""
    return status in TRANSIENT_FAILURES or (status & 0xFF00) == 0xA700
