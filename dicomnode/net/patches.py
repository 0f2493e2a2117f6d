"""Every change dicomnode makes to pynetdicom, and its only use of pynetdicom's internals.

pynetdicom's private attributes (``_servers``, ``_serve_request``, ACSE's
``_negotiate_as_acceptor``, a context's ``_transfer_syntax``) and its internal state (the DUL
and its socket, queues and state machine, the DIMSE provider) may change in any release, so
the patches are tested with the versions in :data:`SUPPORTED_PYNETDICOM` only (the same
range ``pyproject.toml`` pins), and :func:`check_pynetdicom` refuses any other at start-up.
``tests/net/test_patches.py`` shows, for each patch, the upstream behaviour without it.

Acceptor (``scp``): :func:`make_server` (:class:`NoDelayServer`,
:func:`share_supported_contexts`, :func:`register_server`), then on each connection
:func:`check_caller_host` and :func:`guard_association` (:func:`limit_pdu_length`,
:func:`abort_on_undecodable_dimse`, :func:`contain_reactor_errors`,
:func:`end_when_closed_before_request`).  Requestor (``scu``): :func:`prepare_requestor`
(:func:`set_no_delay`, :func:`keep_stray_responses`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.errors import ConfigError

log = logging.getLogger(__name__)

#: The pynetdicom versions these patches were tested with; ``pyproject.toml`` pins the same.
SUPPORTED_PYNETDICOM = ">=3.0.4,<3.1"
_LOWEST_SUPPORTED = (3, 0, 4)
_FIRST_UNSUPPORTED = (3, 1)

#: Largest PDU read whatever ``max_pdu`` says: an A-ASSOCIATE-RQ proposing every storage
#: SOP class with every transfer syntax stays well below it.
MIN_PDU_LIMIT = 1 << 20

#: The DUL event for "unrecognised or invalid PDU" (PS3.8 9.2): the state machine answers
#: it with A-ABORT.
_INVALID_PDU = "Evt19"
#: The DUL state with no transport connection (PS3.8 9.2).
_IDLE = "Sta1"


# --- the supported versions ----------------------------------------------------------------


def _release(version: str) -> tuple[int, ...] | None:
    """The numeric release of a version string ("3.0.4rc1" -> (3, 0, 4)); None if none."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group().split(".")) if match else None


def check_pynetdicom(version: str | None = None) -> None:
    """Refuse to run with a pynetdicom these patches were not tested with.

    ``version`` defaults to the installed ``pynetdicom.__version__``.

    Raises
    ------
    ConfigError
        Naming the installed and the supported versions, when outside
        :data:`SUPPORTED_PYNETDICOM`.
    """
    installed = pynetdicom.__version__ if version is None else version
    release = _release(installed)
    if release is None or not _LOWEST_SUPPORTED <= release < _FIRST_UNSUPPORTED:
        raise ConfigError(
            f"pynetdicom {installed} is installed, but dicomnode's patches to it "
            f"(dicomnode.net.patches) are tested with pynetdicom{SUPPORTED_PYNETDICOM} only: "
            f"pip install 'pynetdicom{SUPPORTED_PYNETDICOM}'"
        )


# --- the acceptor's server ---------------------------------------------------------------


class NoDelayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY and a timeout on every accepted socket.

    pynetdicom sets the network timeout on the listening socket only; accepted sockets are
    blocking without one, so a peer that sends part of a PDU and then nothing holds its
    association (and a slot of ``max_associations``) forever.  With TLS, pynetdicom does
    the handshake inside ``accept``, in the one thread that accepts connections: a peer
    that connects and stays silent stops the node accepting anyone.  Here the handshake
    is left to the association's own thread (OpenSSL performs it on the first read), under
    the same timeout.  Without TCP_NODELAY, peers that also leave Nagle on stall ~45 ms per
    instance.
    """

    #: listen() backlog; socketserver's default of 5 makes a burst of connections (a
    #: PACS opening one association per image, a flood) wait for SYN retransmits (1 s).
    request_queue_size = 128
    #: Offered each accepted connection first (the receive fast path, :mod:`.ul`): True
    #: when it served the connection, False to leave it to pynetdicom untouched.
    divert: Callable[[socket.socket, tuple[str, int]], bool] | None = None
    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port:  # receivers in several processes share the port (app/receiver.py)
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def finish_request(self, request: Any, client_address: Any) -> None:
        divert = self.divert
        tls = isinstance(request, ssl.SSLSocket)
        if divert is not None and not tls and divert(request, client_address):
            self.shutdown_request(request)  # what pynetdicom's Association does at its end
            return
        super().finish_request(request, client_address)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


class ReusePortServer(NoDelayServer):
    """:class:`NoDelayServer` bound with ``SO_REUSEPORT``."""

    reuse_port = True


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


def share_supported_contexts(server: ThreadedAssociationServer) -> None:
    """Make the per-connection copy of the server's supported contexts cheap.

    pynetdicom deep-copies the server's supported presentation contexts for every
    connection: 68 ms of CPU for all storage SOP classes with all transfer syntaxes, so a
    burst of bare TCP connects (a port scan, a health check) kept the node busy.  With
    :class:`ContextList` the copy shares the immutable UIDs.
    """
    server.contexts = ContextList(server.contexts)


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    """Register a server made with ``AE.make_server`` with its AE.

    ``AE.make_server`` does not add the server to the AE's list of servers (only
    ``start_server`` does), yet the server's ``shutdown()`` removes itself from that list:
    unregistered, stopping it raises ``ValueError`` after the accept loop has ended.
    """
    ae._servers.append(server)


def make_server(
    ae: AE,
    address: tuple[str, int],
    handlers: list[Any],
    ssl_context: Any = None,
    divert: Callable[[socket.socket, tuple[str, int]], bool] | None = None,
    reuse_port: bool = False,
) -> ThreadedAssociationServer:
    """``ae.make_server`` with :class:`NoDelayServer`, cheap context copies, registered;
    ``divert`` is offered every connection first (:attr:`NoDelayServer.divert`)."""
    server = ae.make_server(
        address,
        evt_handlers=handlers,
        server_class=ReusePortServer if reuse_port else NoDelayServer,
        ssl_context=ssl_context,
    )
    if divert is not None:
        cast(NoDelayServer, server).divert = divert
    share_supported_contexts(server)
    register_server(ae, server)
    return server


# --- each accepted association -----------------------------------------------------------


class CallerCheckingACSE(ACSE):
    """ACSE that also rejects callers whose (AE title, host) pair is not allowed.

    pynetdicom checks calling AE titles itself but knows nothing of hosts; this check runs
    before its negotiation and answers A-ASSOCIATE-RJ (rejected-permanent, service user,
    calling AE title not recognised)."""

    def __init__(self, assoc: Association, allowed: Callable[[str, str], bool]) -> None:
        super().__init__(assoc)
        self._allowed = allowed

    def _negotiate_as_acceptor(self) -> None:
        primitive: Any = self.requestor.primitive
        title = str(primitive.calling_ae_title).strip()
        if not self._allowed(title, str(self.assoc.requestor.address)):
            self.requestor.ae_title = primitive.calling_ae_title
            self.send_reject(0x01, 0x01, 0x03)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


def check_caller_host(assoc: Association, allowed: Callable[[str, str], bool]) -> None:
    """Reject at association time a caller whose (AE title, host) pair ``allowed`` refuses.

    Upstream accepts any host for an allowed calling AE title (``require_calling_aet``);
    without this, a caller from the wrong host gets its association and only its C-STOREs
    are refused.  Call it from ``EVT_CONN_OPEN``, before the association starts.
    """
    assoc.acse = CallerCheckingACSE(assoc, allowed)


def guard_association(assoc: Association, max_pdu: int) -> None:
    """Install the guards against malformed input (found by ``tests/fuzz``) on a pynetdicom
    acceptor ``Association`` that has not started.

    ``max_pdu`` is the node's maximum PDU length (0: unlimited, no PDU length guard).
    """
    dul: Any = assoc.dul
    if max_pdu and dul.socket is not None:
        limit_pdu_length(dul.socket, max(max_pdu, MIN_PDU_LIMIT))
    abort_on_undecodable_dimse(assoc)
    contain_reactor_errors(assoc)
    end_when_closed_before_request(assoc)


def limit_pdu_length(sock: Any, limit: int) -> None:
    """Make an ``AssociationSocket`` refuse a PDU announcing more than ``limit`` bytes.

    Upstream reads whatever length a PDU header announces (up to 4 GiB), buffering it all;
    a peer announcing gigabytes holds the connection and the memory until it stops sending
    and the network timeout passes.  pynetdicom's DUL reads the 6-byte PDU header, then the
    announced length in one call; returning nothing for that call makes it see a short PDU,
    treat the connection as closed and end the association, without reading the body.
    """
    read = sock.recv

    def recv(count: int) -> bytearray:
        if count > limit:
            log.warning("aborting the association: a PDU of %d bytes, over %d", count, limit)
            return bytearray()
        result: bytearray = read(count)
        return result

    sock.recv = recv


def abort_on_undecodable_dimse(assoc: Association) -> None:
    """Answer a P-DATA whose DIMSE command set cannot be decoded with A-ABORT.

    Upstream aborts for a decoded but invalid DIMSE message, but a command set it cannot
    decode at all (no Command Field, say) raises out of the state machine and ends the
    association's reactor thread without an A-ABORT.  Here the partial message is dropped
    and "invalid PDU" (Evt19) is queued, which the state machine answers with A-ABORT.
    """
    dimse: Any = assoc.dimse
    dul: Any = assoc.dul
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
            dul.event_queue.put(_INVALID_PDU)

    dimse.receive_primitive = receive_primitive


def contain_reactor_errors(assoc: Association) -> None:
    """End an association in one warning line when pynetdicom's state machine raises.

    Upstream lets an exception from the state machine (an A-ABORT PDU with an invalid
    source, a release response racing an abort) escape the DUL thread: the thread dies with
    a traceback and the connection stays open until the peer gives up.  Here it is logged
    in one line and the connection closed.
    """
    dul: Any = assoc.dul
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


def end_when_closed_before_request(assoc: Association) -> None:
    """End the association at once when its connection closes before an A-ASSOCIATE-RQ.

    Upstream keeps waiting for the request until the ACSE timeout (30 s by default),
    counting the connection against ``max_associations``: 9 bare connects (a port scan, a
    load balancer's TCP health check) turned every peer away for that long.
    """
    dul: Any = assoc.dul
    machine = dul.state_machine
    transition = machine.transition

    def transition_and_wake(state: str) -> None:
        transition(state)
        if state == _IDLE and not assoc.is_established and assoc.requestor.primitive is None:
            # The acceptor thread waits for the A-ASSOCIATE-RQ primitive; None is what it
            # gets when that wait times out, and it then ends the association.
            dul.to_user_queue.put(None)

    machine.transition = transition_and_wake


# --- the requestor -------------------------------------------------------------------------


def association_socket(assoc: Association) -> socket.socket | None:
    """The TCP (or TLS) socket under an association, None before it has one."""
    dul: Any = assoc.dul
    raw = getattr(dul.socket, "socket", None)
    return raw if isinstance(raw, socket.socket) else None


def set_no_delay(assoc: Association) -> None:
    """Set TCP_NODELAY on a requestor's socket.

    Upstream leaves Nagle's algorithm on: against a peer that delays its ACKs, every
    C-STORE whose last segment is small waits ~40 ms for the ACK of the previous one.
    """
    sock = association_socket(assoc)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def keep_stray_responses(assoc: Association) -> None:
    """Work around a pynetdicom race that loses a response and stalls ``send_c_store``.

    ``send_*`` pauses the association's reactor before sending, but it checks a flag the
    reactor sets just before pausing: when the reactor is between waking and clearing that
    flag (right after the previous ``send_*`` resumed it), the request goes out unpaused,
    the reactor takes the response off the queue as if it were a request, logs "Received
    unexpected C-STORE service message" and drops it; the sender then waits for the DIMSE
    timeout.  Seen about once in 1,000 back-to-back C-STOREs on a loaded 2-core machine.
    Here a response the reactor takes is put back for the sender.
    """
    serve = assoc._serve_request
    dimse: Any = assoc.dimse

    def serve_request(msg: Any, context_id: int) -> None:
        if getattr(msg, "MessageIDBeingRespondedTo", None) is not None:
            dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_request  # type: ignore[method-assign]


def prepare_requestor(assoc: Association) -> None:
    """The requestor's patches, for an association just established."""
    set_no_delay(assoc)
    keep_stray_responses(assoc)
