"""The receive fast path: a lean DICOM upper layer for storage associations.

pynetdicom serves each association with two threads that poll their queues every
millisecond and decode every PDU into objects: about 2.5 ms per instance before the node
stores anything (docs/performance.md).  Most associations a node sees are a PACS or a
modality pushing images, so those are served here, in one thread, straight from the
socket: P-DATA PDUs are read into one buffer, command fragments are parsed by hand
(implicit VR little endian, a handful of elements), data set fragments are appended to
the instance being received (in memory up to ``receive_in_memory_mb``, beyond that into
a file of the spool's tmp folder as they arrive), and C-STORE-RSP / C-ECHO-RSP are
encoded by hand.

Which associations come here: :func:`peek_associate_rq` reads the A-ASSOCIATE-RQ
without consuming it (``MSG_PEEK``); :func:`fast_path_request` accepts it only when it
is plain: protocol version 1, the DICOM application context, every presentation context
a storage SOP class or Verification, and no user information beyond the maximum length
and the implementation class and version (no role selection, user identity, extended or
asynchronous operations negotiation).  Everything else, Query/Retrieve among it, and
every TLS association, is left in the socket for pynetdicom, which reads the same
request as if nothing had happened.

The node's policies are the same on both paths (:class:`StorageService` is implemented
by :class:`dicomnode.net.scp.StorageSCP`): called AE title, allowed callers and hosts,
``max_associations``, the network timeout on every read, ``max_pdu``, the C-STORE
statuses, the audit and the metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

from dicomnode.shared import ProcessCounts
from dicomnode.spool.journal import RecordBuffer
from dicomnode.spool.store import ReceivedFile

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.7.0.1"
IMPLEMENTATION_VERSION = "DICOMNODE_UL_1"
#: Abstract syntaxes the fast path serves, and transfer syntaxes in pynetdicom's order of
#: preference (the first one the acceptor supports that the requestor proposed).
STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
TRANSFER_SYNTAXES = tuple(str(ts) for ts in ALL_TRANSFER_SYNTAXES)
#: User information sub-items a plain request may carry: maximum length, implementation
#: class UID, implementation version name.
_PLAIN_USER_ITEMS = frozenset({0x51, 0x52, 0x55})
_MAX_PEEK = 65536

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101
_AFFECTED_CLASS, _COMMAND_FIELD, _MESSAGE_ID = 0x00000002, 0x00000100, 0x00000110
_RESPONDED_TO, _DATA_SET_TYPE, _STATUS = 0x00000120, 0x00000800, 0x00000900
_ERROR_COMMENT, _AFFECTED_INSTANCE = 0x00000902, 0x00001000

_U16, _U32 = struct.Struct(">H"), struct.Struct(">I")
_PDU_HEAD = struct.Struct(">BxI")
_ELEMENT = struct.Struct("<HHI")


class ProtocolError(Exception):
    """The peer broke the upper layer protocol: the association is aborted."""


# --- the A-ASSOCIATE-RQ -------------------------------------------------------------------


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class AssociateRequest:
    called_ae: str
    calling_ae: str
    #: (called, calling) as the 32 bytes sent, echoed in the A-ASSOCIATE-AC.
    titles: bytes
    contexts: tuple[ProposedContext, ...]
    #: The peer's maximum PDU length (0: unlimited).
    peer_max_pdu: int
    plain: bool
    why_not_plain: str = ""


def _uid(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii")


def parse_associate_rq(pdu: bytes) -> AssociateRequest:
    """Parse a whole A-ASSOCIATE-RQ PDU (header included); raises ``ValueError``."""
    kind, length = _PDU_HEAD.unpack_from(pdu, 0)
    if kind != A_ASSOCIATE_RQ or len(pdu) != 6 + length or length < 68:
        raise ValueError("not a whole A-ASSOCIATE-RQ")
    version = _U16.unpack_from(pdu, 6)[0]
    titles = pdu[10:42]
    called = titles[:16].decode("ascii").strip()
    calling = titles[16:].decode("ascii").strip()
    contexts: list[ProposedContext] = []
    app_context = ""
    peer_max = 0
    user_items: set[int] = set()
    odd: list[str] = []
    offset = 74
    while offset < len(pdu):
        item, item_len = pdu[offset], _U16.unpack_from(pdu, offset + 2)[0]
        body = pdu[offset + 4 : offset + 4 + item_len]
        if len(body) != item_len:
            raise ValueError("an item runs past the PDU")
        if item == 0x10:
            app_context = _uid(body)
        elif item == 0x20:
            contexts.append(_parse_context(body))
        elif item == 0x50:
            sub = 0
            while sub < len(body):
                sub_type, sub_len = body[sub], _U16.unpack_from(body, sub + 2)[0]
                if sub + 4 + sub_len > len(body):
                    raise ValueError("a user information item runs past its item")
                user_items.add(sub_type)
                if sub_type == 0x51 and sub_len == 4:
                    peer_max = _U32.unpack_from(body, sub + 4)[0]
                sub += 4 + sub_len
        else:
            odd.append(f"item 0x{item:02X}")
        offset += 4 + item_len
    if version & 1 != 1:
        odd.append(f"protocol version {version}")
    if app_context != APPLICATION_CONTEXT:
        odd.append(f"application context {app_context!r}")
    if not contexts:
        odd.append("no presentation context")
    others = [c.abstract_syntax for c in contexts if not _fast_class(c.abstract_syntax)]
    if others:
        odd.append(f"abstract syntax {others[0]}")
    if user_items - _PLAIN_USER_ITEMS:
        odd.append("user information " + ", ".join(f"0x{i:02X}" for i in sorted(user_items)))
    return AssociateRequest(
        called, calling, titles, tuple(contexts), peer_max, not odd, "; ".join(odd)
    )


def _fast_class(uid: str) -> bool:
    return uid == VERIFICATION or uid in STORAGE_CLASSES


def _parse_context(body: bytes) -> ProposedContext:
    context_id = body[0]
    abstract = ""
    syntaxes: list[str] = []
    sub = 4
    while sub < len(body):
        sub_type, sub_len = body[sub], _U16.unpack_from(body, sub + 2)[0]
        value = body[sub + 4 : sub + 4 + sub_len]
        if len(value) != sub_len:
            raise ValueError("a presentation context sub-item runs past its item")
        if sub_type == 0x30:
            abstract = _uid(value)
        elif sub_type == 0x40:
            syntaxes.append(_uid(value))
        sub += 4 + sub_len
    if not abstract or not syntaxes:
        raise ValueError(f"presentation context {context_id} lacks its syntaxes")
    return ProposedContext(context_id, abstract, tuple(syntaxes))


def negotiate(contexts: tuple[ProposedContext, ...]) -> list[tuple[int, int, str]]:
    """(context ID, result, transfer syntax) per proposed context, as pynetdicom's acceptor
    decides for the same supported contexts: the first of the node's transfer syntaxes
    the requestor proposed (0x00), else "transfer syntaxes not supported" (0x04)."""
    results = []
    for cx in contexts:
        chosen = next((ts for ts in TRANSFER_SYNTAXES if ts in cx.transfer_syntaxes), None)
        if chosen is None:
            results.append((cx.context_id, 0x04, cx.transfer_syntaxes[0]))
        else:
            results.append((cx.context_id, 0x00, chosen))
    return results


def _item(kind: int, body: bytes) -> bytes:
    return bytes((kind, 0)) + _U16.pack(len(body)) + body


def encode_associate_ac(
    request: AssociateRequest, results: list[tuple[int, int, str]], max_pdu: int
) -> bytes:
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for context_id, result, syntax in results:
        items.append(_item(0x21, bytes((context_id, 0, result, 0)) + _item(0x40, syntax.encode())))
    user = (
        _item(0x51, _U32.pack(max_pdu))
        + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
        + _item(0x55, IMPLEMENTATION_VERSION.encode())
    )
    items.append(_item(0x50, user))
    body = b"\x00\x01\x00\x00" + request.titles + bytes(32) + b"".join(items)
    return _PDU_HEAD.pack(A_ASSOCIATE_AC, len(body)) + body


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    return _PDU_HEAD.pack(A_ASSOCIATE_RJ, 4) + bytes((0, result, source, reason))


def encode_abort(source: int = 0x02, reason: int = 0x00) -> bytes:
    return _PDU_HEAD.pack(A_ABORT, 4) + bytes((0, 0, source, reason))


RELEASE_RP = _PDU_HEAD.pack(A_RELEASE_RP, 4) + bytes(4)


def peek_associate_rq(sock: socket.socket, timeout: float) -> bytes | None:
    """The A-ASSOCIATE-RQ waiting in ``sock``, left unread; None when what waits is not a
    whole one of at most 64 KiB within ``timeout`` (the caller hands the socket on)."""
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        head = sock.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(head) < 6 or head[0] != A_ASSOCIATE_RQ:
            return None
        length = _U32.unpack_from(head, 2)[0]
        if length > _MAX_PEEK:
            return None
        pdu = sock.recv(6 + length, socket.MSG_PEEK | socket.MSG_WAITALL)
        return pdu if len(pdu) == 6 + length else None
    except OSError:  # timeout, reset: pynetdicom reports it as it always has
        return None
    finally:
        sock.settimeout(previous)


# --- DIMSE command sets ---------------------------------------------------------------------


def parse_command(data: bytes) -> dict[int, bytes]:
    """Elements of a command set (implicit VR little endian) by tag; raises ``ValueError``."""
    elements: dict[int, bytes] = {}
    offset = 0
    end = len(data)
    while offset < end:
        if offset + 8 > end:
            raise ValueError("a command element is truncated")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0 or offset + length > end:
            raise ValueError(f"command element ({group:04X},{element:04X}) is invalid")
        elements[element] = data[offset : offset + length]
        offset += length
    return elements


def _us(elements: dict[int, bytes], tag: int) -> int:
    value = elements.get(tag, b"")
    if len(value) != 2:
        raise ValueError(f"command element (0000,{tag:04X}) is missing or not US")
    return int.from_bytes(value, "little")


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set with its group length, elements in tag order."""
    body = b"".join(_ELEMENT.pack(0, tag, len(v)) + v for tag, v in sorted(elements))
    return _ELEMENT.pack(0, 0, 4) + len(body).to_bytes(4, "little") + body


def store_response(
    sop_class: str, sop_instance: str, message_id: int, status: int, comment: str = ""
) -> bytes:
    elements = [
        (_AFFECTED_CLASS, _text(sop_class, b"\0")),
        (_COMMAND_FIELD, C_STORE_RSP.to_bytes(2, "little")),
        (_RESPONDED_TO, message_id.to_bytes(2, "little")),
        (_DATA_SET_TYPE, NO_DATA_SET.to_bytes(2, "little")),
        (_STATUS, status.to_bytes(2, "little")),
        (_AFFECTED_INSTANCE, _text(sop_instance, b"\0")),
    ]
    if comment and status >= 0xA000:  # LO: one value, no backslash or control characters
        clean = "".join(c if " " <= c < "\x7f" and c != "\\" else "/" for c in comment)
        elements.append((_ERROR_COMMENT, _text(clean[:64], b" ")))
    return encode_command(elements)


def echo_response(message_id: int) -> bytes:
    return encode_command(
        [
            (_AFFECTED_CLASS, _text(VERIFICATION, b"\0")),
            (_COMMAND_FIELD, C_ECHO_RSP.to_bytes(2, "little")),
            (_RESPONDED_TO, message_id.to_bytes(2, "little")),
            (_DATA_SET_TYPE, NO_DATA_SET.to_bytes(2, "little")),
            (_STATUS, b"\x00\x00"),
        ]
    )


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (explicit VR little endian)."""

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2sHI", 2, tag, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 2, tag, vr, len(value)) + value

    body = b"".join(
        (
            element(0x0001, b"OB", b"\x00\x01"),
            element(0x0002, b"UI", _text(sop_class, b"\0")),
            element(0x0003, b"UI", _text(sop_instance, b"\0")),
            element(0x0010, b"UI", _text(transfer_syntax, b"\0")),
            element(0x0012, b"UI", _text(IMPLEMENTATION_CLASS_UID, b"\0")),
            element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION, b" ")),
            *([element(0x0016, b"AE", _text(source_ae, b" "))] if source_ae else []),
        )
    )
    return bytes(128) + b"DICM" + element(0x0000, b"UL", len(body).to_bytes(4, "little")) + body


# --- serving an association -------------------------------------------------------------


class StorageService(Protocol):
    """What the fast path asks of the node (:class:`dicomnode.net.scp.StorageSCP`)."""

    def admit(self, request: AssociateRequest, host: str) -> tuple[int, int, int, str] | None:
        """None to accept, else the A-ASSOCIATE-RJ (result, source, reason) and why."""
        ...

    def association_event(self, key: object, calling_ae: str, host: str, outcome: str) -> None:
        """accepted, released or aborted."""
        ...

    def store(
        self,
        key: object,
        calling_ae: str,
        host: str,
        sop_class: str,
        sop_instance: str,
        encoded: bytes | RecordBuffer | ReceivedFile,
        sha256: str | None,
        spooled: Callable[[], None] | None = None,
    ) -> tuple[int, str]:
        """Log one received instance (the buffer or file is the service's from now on):
        (status, reason when refused); for a buffer, ``spooled`` is called once its spool
        file and index row are written (after the answer)."""
        ...

    def receive_into_file(self) -> ReceivedFile:
        """A file to receive an instance too large for memory into."""
        ...

    def refuse(
        self, key: object, calling_ae: str, host: str, size: int, status: int, reason: str
    ) -> None:
        """An instance refused before it could be stored (too large)."""
        ...

    def take_buffer(self) -> RecordBuffer:
        """A buffer to receive an instance into (blocks while the spool is behind)."""
        ...

    def give_buffer(self, buffer: RecordBuffer) -> None:
        """A buffer not handed to :meth:`store` after all."""
        ...


@dataclass
class _Receiving:
    """The C-STORE whose data set is arriving."""

    context_id: int
    sop_class: str
    sop_instance: str
    message_id: int
    #: Where the instance goes: memory, or past ``memory_bytes`` a file.
    buffer: RecordBuffer | None
    meta_length: int
    digest: Any = None
    received: int = 0
    file: ReceivedFile | None = None
    #: Over ``max_instance_bytes``: the rest is read and dropped.
    dropped: bool = False

    def discard(self, service: StorageService) -> None:
        """Give back what holds the bytes (a store cut short, or refused as too large)."""
        if self.buffer is not None:
            service.give_buffer(self.buffer)
            self.buffer = None
        if self.file is not None:
            self.file.discard()
            self.file = None


class StorageAssociation:
    """One storage association served from its socket, in the calling thread."""

    def __init__(
        self,
        sock: socket.socket,
        host: str,
        request: AssociateRequest,
        service: StorageService,
        *,
        max_pdu: int,
        max_instance_bytes: int,
        timeout: float,
        memory_bytes: int = 16 * 2**20,
    ) -> None:
        self.sock = sock
        self.memory_bytes = memory_bytes
        self.host = host
        self.request = request
        self.service = service
        self.max_pdu = max_pdu
        self.max_instance_bytes = max_instance_bytes
        self.timeout = timeout
        self.key = object()
        self._buffer = bytearray(max(65536, min(max_pdu or 1 << 20, 4 << 20)) + 6)
        self._contexts: dict[int, tuple[str, str]] = {}
        self._command = bytearray()
        self._command_context = 0
        self._receiving: _Receiving | None = None
        self._send_limit = request.peer_max_pdu or (1 << 20)
        self._spooling = threading.Condition()
        self._unspooled = 0
        self._reported = False

    def _spooled(self) -> None:
        with self._spooling:
            self._unspooled -= 1
            self._spooling.notify_all()

    def _wait_spooled(self) -> None:
        """Before the release is answered: the instances acknowledged on this association
        are in the spool and the index (the sender sees them there once it is released)."""
        with self._spooling:
            if not self._spooling.wait_for(lambda: self._unspooled <= 0, self.timeout):
                log.warning(
                    "association from %s: %d instance(s) still being spooled at release "
                    "(they are in the receive log)",
                    self.request.calling_ae,
                    self._unspooled,
                )

    def serve(self, raw_request: bytes) -> str:
        """Consume the peeked request, answer it, serve until release or abort; returns
        the outcome (rejected, released, aborted)."""
        self.sock.settimeout(self.timeout)
        self._read_exact(len(raw_request))  # the A-ASSOCIATE-RQ peeked before
        calling = self.request.calling_ae
        refusal = self.service.admit(self.request, self.host)
        if refusal is not None:
            result, source, reason, _ = refusal
            self._send(encode_associate_rj(result, source, reason))
            return "rejected"
        results = negotiate(self.request.contexts)
        for (context_id, result, syntax), cx in zip(results, self.request.contexts, strict=True):
            if result == 0x00:
                self._contexts[context_id] = (cx.abstract_syntax, syntax)
        self._send(encode_associate_ac(self.request, results, self.max_pdu))
        self.service.association_event(self.key, calling, self.host, "accepted")
        outcome = "aborted"
        try:
            outcome = self._loop()
        except ProtocolError as exc:
            log.warning("association from %s at %s aborted: %s", calling, self.host, exc)
            self._try_send(encode_abort(0x02, 0x00))
        except TimeoutError:
            log.warning(
                "association from %s at %s aborted: nothing received for %.0f s",
                calling,
                self.host,
                self.timeout,
            )
            self._try_send(encode_abort(0x02, 0x00))
        except (ConnectionError, OSError) as exc:
            log.info("association from %s at %s lost: %s", calling, self.host, exc)
        finally:
            if self._receiving is not None:
                self._receiving.discard(self.service)  # a store cut short
                self._receiving = None
            self._ended(outcome)
        return outcome

    def _ended(self, outcome: str) -> None:
        if not self._reported:
            self._reported = True
            self.service.association_event(self.key, self.request.calling_ae, self.host, outcome)

    def _loop(self) -> str:
        while True:
            kind, length = _PDU_HEAD.unpack(self._read_exact(6))
            if kind == P_DATA_TF:
                if self.max_pdu and length > max(self.max_pdu, 1 << 20):
                    raise ProtocolError(f"a P-DATA-TF of {length} bytes exceeds max_pdu")
                self._p_data(self._read_exact(length))
            elif kind in (A_RELEASE_RQ, A_ABORT) and length != 4:
                raise ProtocolError(f"a PDU of type 0x{kind:02X} with length {length}, not 4")
            elif kind == A_RELEASE_RQ:
                self._read_exact(length)
                if self._receiving is not None or self._command:
                    raise ProtocolError("A-RELEASE-RQ in the middle of a message")
                self._wait_spooled()
                self._ended("released")  # logged before the peer can see the release end
                self._send(RELEASE_RP)
                return "released"
            elif kind == A_ABORT:
                self._read_exact(length)
                return "aborted"
            else:
                raise ProtocolError(f"unexpected PDU type 0x{kind:02X}")

    def _p_data(self, pdu: memoryview) -> None:
        offset, end = 0, len(pdu)
        if end < 6:
            raise ProtocolError("an empty P-DATA-TF")
        while offset < end:
            if offset + 6 > end:
                raise ProtocolError("a PDV item is truncated")
            item_length = _U32.unpack_from(pdu, offset)[0]
            if item_length < 2 or offset + 4 + item_length > end:
                raise ProtocolError("a PDV item runs past its PDU")
            context_id, control = pdu[offset + 4], pdu[offset + 5]
            fragment = pdu[offset + 6 : offset + 4 + item_length]
            offset += 4 + item_length
            if context_id not in self._contexts:
                raise ProtocolError(f"a PDV on presentation context {context_id}, not accepted")
            if control & 1:
                self._command_fragment(context_id, fragment, bool(control & 2))
            else:
                self._data_fragment(context_id, fragment, bool(control & 2))

    def _command_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        if self._receiving is not None:
            raise ProtocolError("a command fragment in the middle of a data set")
        self._command += fragment
        self._command_context = context_id
        if not last:
            if len(self._command) > 65536:
                raise ProtocolError("a command set over 64 KiB")
            return
        try:
            command = parse_command(bytes(self._command))
            field_ = _us(command, _COMMAND_FIELD)
            message_id = _us(command, _MESSAGE_ID)
            has_data = _us(command, _DATA_SET_TYPE) != NO_DATA_SET
        except ValueError as exc:
            raise ProtocolError(f"undecodable command set: {exc}") from exc
        finally:
            self._command.clear()
        if field_ == C_ECHO_RQ and not has_data:
            self._send_command(context_id, echo_response(message_id))
            return
        if field_ != C_STORE_RQ or not has_data:
            raise ProtocolError(f"command 0x{field_:04X} is not served on a storage association")
        sop_class = _uid(command.get(_AFFECTED_CLASS, b""))
        sop_instance = _uid(command.get(_AFFECTED_INSTANCE, b""))
        meta = file_meta(
            sop_class, sop_instance, self._contexts[context_id][1], self.request.calling_ae
        )
        buffer = self.service.take_buffer()
        buffer.reset()
        buffer.extend(meta)
        self._receiving = _Receiving(
            context_id, sop_class, sop_instance, message_id, buffer, len(meta), hashlib.sha256(meta)
        )

    def _data_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        receiving = self._receiving
        if receiving is None or context_id != receiving.context_id:
            raise ProtocolError("a data set fragment without its C-STORE request")
        receiving.received += len(fragment)
        if receiving.dropped:
            pass
        elif receiving.received > self.max_instance_bytes:
            receiving.discard(self.service)
            receiving.dropped = True
        else:
            buffer = receiving.buffer
            if buffer is not None and buffer.length + len(fragment) > self.memory_bytes:
                # Too large for memory: what came so far and the rest go to a file.
                receiving.file = self.service.receive_into_file()
                receiving.file.write(buffer.body)
                self.service.give_buffer(buffer)
                receiving.buffer = buffer = None
            if buffer is not None:
                buffer.extend(fragment)
            elif receiving.file is not None:
                receiving.file.write(fragment)
            receiving.digest.update(fragment)
        if last:
            self._receiving = None
            self._answer_store(receiving)

    def _answer_store(self, receiving: _Receiving) -> None:
        calling = self.request.calling_ae
        if receiving.dropped or (receiving.buffer is None and receiving.file is None):
            reason = f"instance larger than the maximum of {self.max_instance_bytes} bytes"
            code = 0xA700
            self.service.refuse(self.key, calling, self.host, receiving.received, code, reason)
        elif receiving.file is not None:
            code, reason = self.service.store(
                self.key,
                calling,
                self.host,
                receiving.sop_class,
                receiving.sop_instance,
                receiving.file,
                receiving.digest.hexdigest(),
            )
        elif receiving.buffer is not None:
            with self._spooling:
                self._unspooled += 1
            code, reason = self.service.store(
                self.key,
                calling,
                self.host,
                receiving.sop_class,
                receiving.sop_instance,
                receiving.buffer,
                receiving.digest.hexdigest(),
                self._spooled,
            )
            if code != 0:
                self._spooled()
        self._send_command(
            receiving.context_id,
            store_response(
                receiving.sop_class, receiving.sop_instance, receiving.message_id, code, reason
            ),
        )

    # --- the socket ---------------------------------------------------------------------

    def _send_command(self, context_id: int, command: bytes) -> None:
        """One P-DATA-TF holding the whole command set (a response is far below any peer's
        maximum PDU length, which is at least the 4 KiB a valid peer announces)."""
        pdv = _U32.pack(len(command) + 2) + bytes((context_id, 0x03)) + command
        self._send(_PDU_HEAD.pack(P_DATA_TF, len(pdv)) + pdv)

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _try_send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def _read_exact(self, count: int) -> memoryview:
        """The next ``count`` bytes, in the association's buffer (valid until the next
        read)."""
        if count > len(self._buffer):
            self._buffer = bytearray(count)
        view = memoryview(self._buffer)
        got = 0
        while got < count:
            n = self.sock.recv_into(view[got:count], count - got)
            if n == 0:
                raise ConnectionError("the peer closed the connection")
            got += n
        return view[:count]


class FastPath:
    """Decides per accepted connection whether the fast path serves it, and keeps count of
    the associations it serves (in ``count`` too: ``max_associations`` counts both paths
    and every receiving process).
    """

    def __init__(
        self,
        service: StorageService,
        *,
        max_pdu: int,
        max_instance_bytes: int,
        timeout: float,
        acse_timeout: Callable[[], float],
        memory_bytes: int = 16 * 2**20,
        count: ProcessCounts | None = None,
    ) -> None:
        self.service = service
        self.count = count or ProcessCounts()
        self.max_pdu = max_pdu
        self.max_instance_bytes = max_instance_bytes
        self.memory_bytes = memory_bytes
        self.timeout = timeout
        self.acse_timeout = acse_timeout
        self._active = 0
        self._idle = threading.Condition()
        self.served = 0

    @property
    def active(self) -> int:
        return self._active

    def try_serve(self, sock: socket.socket, address: tuple[str, int]) -> bool:
        """Serve the connection if its request is plain; False leaves it untouched."""
        raw = peek_associate_rq(sock, self.acse_timeout())
        if raw is None:
            log.debug("connection from %s served by pynetdicom: no whole request", address[0])
            return False
        try:
            request = parse_associate_rq(raw)
        except (ValueError, UnicodeDecodeError, struct.error, IndexError) as exc:
            log.debug("association from %s served by pynetdicom: %s", address[0], exc)
            return False
        if not request.plain:
            log.debug(
                "association from %s served by pynetdicom: %s", address[0], request.why_not_plain
            )
            return False
        association = StorageAssociation(
            sock,
            str(address[0]),
            request,
            self.service,
            max_pdu=self.max_pdu,
            max_instance_bytes=self.max_instance_bytes,
            timeout=self.timeout,
            memory_bytes=self.memory_bytes,
        )
        with self._idle:
            self._active += 1
            self.served += 1  # associations taken (counted before the peer can see the end)
        self.count.change(1)
        try:
            association.serve(raw)
        finally:
            self.count.change(-1)
            with self._idle:
                self._active -= 1
                self._idle.notify_all()
        return True

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the associations in progress to end (a graceful stop)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)


#: ``(socket, address) -> served?``: how the acceptor's server asks the fast path.
Divert = Callable[[socket.socket, tuple[str, int]], bool]
