"""DICOM status codes: the one place where our errors become statuses, and where a peer's
status is classified.

Categories are pynetdicom's (:func:`pynetdicom.status.code_to_category`, PS3.7 Annex C):
Success (0x0000), Warning (0x0001, 0x0107, 0x0116, 0xB000-0xBFFF), Failure (0xA000-0xAFFF,
0xC000-0xCFFF and the general failures 0x0105-0x0124, 0x0210-0x0213), Cancel, Pending.
A warning means the peer stored the instance (PS3.4 B.2.3): it counts as a success and the
caller logs it.  Failures are *transient* when the peer may accept the instance later (out
of resources, 0xA700-0xA7FF; resource limitation, 0x0213) and permanent otherwise (0xA900
data set does not match SOP class, 0xC000-0xCFFF cannot understand, 0x0122 SOP class not
supported, 0x0124 not authorised, ...).  An unknown code counts as a permanent failure.
"""

from __future__ import annotations

import logging

from pynetdicom.status import (
    STATUS_FAILURE,
    STATUS_SUCCESS,
    STATUS_UNKNOWN,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from dicomnode.errors import InvalidInstanceError, OutOfResourcesError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
REFUSED_NOT_AUTHORIZED = 0x0124
REFUSED_OUT_OF_RESOURCES = 0xA700
ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
ERROR_CANNOT_UNDERSTAND = 0xC210
ERROR_UNEXPECTED = 0xC211
RESOURCE_LIMITATION = 0x0213
#: Refused: out of resources (PS3.4 B.2.3), each code of the range.
OUT_OF_RESOURCES = range(0xA700, 0xA800)


def status_for(exc: BaseException) -> int:
    """Map an exception raised while storing to the C-STORE status to answer."""
    if isinstance(exc, OutOfResourcesError):
        return REFUSED_OUT_OF_RESOURCES
    if isinstance(exc, InvalidInstanceError):
        return ERROR_CANNOT_UNDERSTAND
    return ERROR_UNEXPECTED


def category(code: int) -> str:
    """The status category: "Success", "Warning", "Failure", "Cancel", "Pending" or
    "Unknown" (pynetdicom's names, PS3.7 Annex C)."""
    if code < 0:
        return STATUS_UNKNOWN  # pynetdicom raises for negative codes
    return code_to_category(code)


def is_success(code: int) -> bool:
    """The peer stored the instance: Success or Warning."""
    return category(code) in (STATUS_SUCCESS, STATUS_WARNING)


def is_warning(code: int) -> bool:
    """Stored, with a warning (coercion, attribute list error, value out of range...)."""
    return category(code) == STATUS_WARNING


def is_transient(code: int) -> bool:
    """Failures a destination may stop returning later (out of resources, busy)."""
    return category(code) == STATUS_FAILURE and (
        code in OUT_OF_RESOURCES or code == RESOURCE_LIMITATION
    )


def describe(code: int) -> str:
    """``0xB000 (Warning: Coercion of Data Elements)``, for log lines and errors."""
    kind = category(code)
    _, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (kind, ""))
    return f"0x{code:04X} ({kind}: {meaning})" if meaning else f"0x{code:04X} ({kind})"
