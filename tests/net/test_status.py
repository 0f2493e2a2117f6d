"""Statuses by the standard's categories (PS3.7 Annex C, PS3.4 B.2.3), sending included.

A peer that stores an instance with a warning has stored it: the result is delivered (and
logged), not dead-lettered.  Out of resources is worth retrying; a refusal is not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.errors import InvalidInstanceError, OutOfResourcesError, SpoolError
from dicomnode.net import status
from dicomnode.net.scu import Peer, send_files

PACS_AE = "PACS"

#: code: (is_success, is_warning, is_transient, category)
CLASSES = {
    0x0000: (True, False, False, "Success"),
    0x0001: (True, True, False, "Warning"),
    0x0107: (True, True, False, "Warning"),
    0x0116: (True, True, False, "Warning"),
    0xB000: (True, True, False, "Warning"),
    0xB007: (True, True, False, "Warning"),
    0xBFFF: (True, True, False, "Warning"),
    0xA700: (False, False, True, "Failure"),
    0xA7FF: (False, False, True, "Failure"),
    0x0213: (False, False, True, "Failure"),
    0xA900: (False, False, False, "Failure"),
    0xC000: (False, False, False, "Failure"),
    0xC210: (False, False, False, "Failure"),
    0xCFFF: (False, False, False, "Failure"),
    0x0122: (False, False, False, "Failure"),
    0x0124: (False, False, False, "Failure"),
    0x0110: (False, False, False, "Failure"),
    0xFE00: (False, False, False, "Cancel"),
    0xD000: (False, False, False, "Unknown"),
}


@pytest.mark.parametrize("code", list(CLASSES), ids=[f"0x{c:04X}" for c in CLASSES])
def test_each_status_class(code: int) -> None:
    success, warning, transient, category = CLASSES[code]
    assert status.is_success(code) is success
    assert status.is_warning(code) is warning
    assert status.is_transient(code) is transient
    assert status.category(code) == category


def test_the_named_statuses_keep_their_codes() -> None:
    assert (status.SUCCESS, status.REFUSED_NOT_AUTHORIZED) == (0x0000, 0x0124)
    assert status.REFUSED_OUT_OF_RESOURCES == 0xA700
    assert status.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert (status.ERROR_CANNOT_UNDERSTAND, status.ERROR_UNEXPECTED) == (0xC210, 0xC211)


def test_errors_map_to_one_status_each() -> None:
    assert status.status_for(OutOfResourcesError("full")) == status.REFUSED_OUT_OF_RESOURCES
    assert status.status_for(InvalidInstanceError("bad")) == status.ERROR_CANNOT_UNDERSTAND
    assert status.status_for(SpoolError("index")) == status.ERROR_UNEXPECTED
    assert status.status_for(RuntimeError("other")) == status.ERROR_UNEXPECTED


def test_describe_names_the_code_and_its_meaning() -> None:
    assert status.describe(0xB000) == "0xB000 (Warning: Coercion of Data Elements)"
    assert status.describe(0x0107) == "0x0107 (Warning: Attribute List Error)"
    assert status.describe(0xB123) == "0xB123 (Warning)"
    assert status.describe(0xA702) == "0xA702 (Failure: Refused: Out of Resources)"


# --- end to end: a real storage SCP answering a given status -------------------------------


class AnsweringSCP:
    """A pynetdicom storage SCP on 127.0.0.1 whose C-STORE handler answers ``self.code``."""

    def __init__(self) -> None:
        self.code = status.SUCCESS
        self.received: list[str] = []
        ae = AE(ae_title=PACS_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server: ThreadedAssociationServer = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._handle)]
        )
        self.ae = ae

    @property
    def peer(self) -> Peer:
        return Peer(PACS_AE, "127.0.0.1", int(self.server.server_address[1]), timeout_s=10.0)

    def _handle(self, event: Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[union-attr]
        return self.code


@pytest.fixture
def pacs() -> Iterator[AnsweringSCP]:
    scp = AnsweringSCP()
    yield scp
    scp.ae.shutdown()


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0x0107, "delivered"),
        (0x0116, "delivered"),
        (0xB000, "delivered"),
        (0xA700, "transient"),
        (0xA900, "permanent"),
        (0xC000, "permanent"),
        (0x0122, "permanent"),
    ],
    ids=lambda v: f"0x{v:04X}" if isinstance(v, int) else v,
)
def test_send_files_classifies_the_peer_status(
    pacs: AnsweringSCP,
    small_file: Path,
    code: int,
    outcome: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a storage SCP that answers every C-STORE with ``code``
    pacs.code = code
    # When a file is sent to it
    with caplog.at_level(logging.WARNING, logger="dicomnode.net.scu"):
        [result] = send_files(pacs.peer, [small_file], "DICOMNODE")
    # Then the result carries the status and is delivered, worth retrying, or neither
    assert pacs.received and result.status == code
    assert result.ok is (outcome == "delivered")
    assert result.warning is (outcome == "delivered")
    assert status.is_transient(result.status) is (outcome == "transient")
    # And a warning is logged in one line naming the status and its meaning
    warnings = [r.getMessage() for r in caplog.records if r.name == "dicomnode.net.scu"]
    if outcome == "delivered":
        assert len(warnings) == 1, warnings
        assert status.describe(code) in warnings[0] and PACS_AE in warnings[0]
    else:
        assert warnings == []


def test_a_plain_success_logs_nothing(
    pacs: AnsweringSCP, small_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dicomnode.net.scu"):
        [result] = send_files(pacs.peer, [small_file], "DICOMNODE")
    assert result.ok and not result.warning and result.status == status.SUCCESS
    assert [r for r in caplog.records if r.name == "dicomnode.net.scu"] == []
