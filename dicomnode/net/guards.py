"""Guards around pynetdicom's acceptor for malformed input (found by ``tests/fuzz``).

Installed on each accepted association before it starts (:func:`guard_association`):

- a PDU whose header announces more than the node allows is refused before its body is
  read: pynetdicom would otherwise buffer whatever length the header says (up to 4 GiB);
- a P-DATA whose DIMSE command set cannot be decoded (no Command Field, say) aborts the
  association with A-ABORT, as pynetdicom does for other invalid DIMSE messages; unguarded,
  the exception ends the association's reactor thread;
- any other exception that escapes pynetdicom's state machine (an A-ABORT PDU with an
  invalid source, a release response racing an abort) is logged in one line and the
  connection closed, instead of killing the reactor thread with a traceback;
- a connection that closes before its A-ASSOCIATE-RQ ends its association at once:
  pynetdicom kept waiting for the request until the ACSE timeout (30 s), counting it
  against ``max_associations``, so 9 bare connects (a port scan, a load balancer's TCP
  health check) turned every peer away for that long.

:class:`ContextList` makes accepting a connection cheap: pynetdicom deep-copies the server's
supported presentation contexts for every connection, 68 ms of CPU for all storage SOP
classes with all transfer syntaxes, so a burst of bare TCP connects kept the node busy.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

log = logging.getLogger(__name__)

#: Largest PDU read whatever ``max_pdu`` says: an A-ASSOCIATE-RQ proposing every storage
#: SOP class with every transfer syntax stays well below it.
MIN_PDU_LIMIT = 1 << 20

#: The DUL event for "unrecognised or invalid PDU" (PS3.8 9.2): the state machine answers
#: it with A-ABORT.
_INVALID_PDU = "Evt19"
#: The DUL state with no transport connection (PS3.8 9.2).
_IDLE = "Sta1"


def guard_association(assoc: Any, max_pdu: int) -> None:
    """Install the guards on a pynetdicom acceptor ``Association`` that has not started.

    ``max_pdu`` is the node's maximum PDU length (0: unlimited, no PDU length guard).
    """
    if max_pdu and assoc.dul.socket is not None:
        limit_pdu_length(assoc.dul.socket, max(max_pdu, MIN_PDU_LIMIT))
    _abort_on_undecodable_dimse(assoc)
    _contain_reactor_errors(assoc)
    _end_when_closed_before_request(assoc)


def limit_pdu_length(sock: Any, limit: int) -> None:
    """Make an ``AssociationSocket`` refuse a PDU announcing more than ``limit`` bytes.

    pynetdicom's DUL reads the 6-byte PDU header, then the announced length in one call;
    returning nothing for that call makes it see a short PDU, treat the connection as
    closed and end the association, without reading the body.
    """
    read = sock.recv

    def recv(count: int) -> bytearray:
        if count > limit:
            log.warning("aborting the association: a PDU of %d bytes, over %d", count, limit)
            return bytearray()
        result: bytearray = read(count)
        return result

    sock.recv = recv


def _abort_on_undecodable_dimse(assoc: Any) -> None:
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        try:
            receive(primitive)
        except Exception as exc:
            log.warning(
                "aborting the association: undecodable DIMSE message (%s: %s)",
                type(exc).__name__,
                exc,
            )
            dimse.message = None
            assoc.dul.event_queue.put(_INVALID_PDU)

    dimse.receive_primitive = receive_primitive


def _contain_reactor_errors(assoc: Any) -> None:
    dul = assoc.dul
    run = dul.run

    def guarded_run() -> None:
        try:
            run()
        except Exception as exc:
            log.warning(
                "association ended: pynetdicom failed on the peer's input (%s: %s)",
                type(exc).__name__,
                exc,
            )
            with contextlib.suppress(Exception):
                dul.socket.close()

    dul.run = guarded_run


class ContextList(list[Any]):
    """A server's supported presentation contexts, deep-copied per connection cheaply.

    Negotiation only reads the acceptor's contexts; each copy still gets its own context
    objects and transfer syntax lists (UIDs are immutable strings).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


def _end_when_closed_before_request(assoc: Any) -> None:
    machine = assoc.dul.state_machine
    transition = machine.transition

    def transition_and_wake(state: str) -> None:
        transition(state)
        if state == _IDLE and not assoc.is_established and assoc.requestor.primitive is None:
            # The acceptor thread waits for the A-ASSOCIATE-RQ primitive; None is what it
            # gets when that wait times out, and it then ends the association.
            assoc.dul.to_user_queue.put(None)

    machine.transition = transition_and_wake
