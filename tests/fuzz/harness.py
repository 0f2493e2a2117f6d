"""What the fuzz tests share: seed instances, raw senders, a crash detector, a liveness check.

Every send has a timeout; one that exceeds it fails the test as a hang.  A *crash* is an
exception that escaped a handler or a thread of the node: pynetdicom logs those as
"Exception in ..." / "Exception raised in ...", our own code logs them with a traceback
(``log.exception``), and a dying thread reaches :func:`threading.excepthook`.
pynetdicom's own lines about an undecodable PDU ("Unable to decode the received PDU data")
are the clean abort this suite expects, not crashes.
"""

from __future__ import annotations

import io
import logging
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from hypothesis import HealthCheck, settings
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_data_element, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association

from dicomnode.app.node import Node
from dicomnode.net import status
from dicomnode.net.patches import keep_stray_responses
from dicomnode.net.scu import Peer, echo, send_files
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom

NODE_AE = "DICOMNODE"
FUZZ_AE = "FUZZER"
#: Seconds any single send or wait may take before the test calls it a hang.
SEND_TIMEOUT_S = 10.0
#: A liveness check (C-ECHO + a valid C-STORE on new associations) every this many cases.
LIVENESS_EVERY = 50
SEED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless)
REFUSED = frozenset({status.ERROR_CANNOT_UNDERSTAND, status.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS})
LONG_VRS = frozenset(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"])


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible: derandomized, no example database, no deadline (the node is real)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- seeds: small valid instances and the byte span of each top-level element -----------


@dataclass(frozen=True)
class Element:
    """One top-level element of a seed: its tag, VR and encoded bytes (header + value)."""

    tag: int
    vr: str
    encoded: bytes
    header_length: int

    @property
    def value(self) -> bytes:
        return self.encoded[self.header_length :]


@dataclass(frozen=True)
class Seed:
    """A valid CT instance (32 x 32) encoded in one transfer syntax, element by element."""

    transfer_syntax: UID
    elements: tuple[Element, ...]
    sop_instance_uid: str
    dataset: Dataset = field(repr=False)
    #: The other slices of the seed's series (``make_seeds(slices=n)``), unchanged.
    others: tuple[Dataset, ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        return str(self.transfer_syntax.name)

    @property
    def body(self) -> bytes:
        return b"".join(e.encoded for e in self.elements)

    @property
    def implicit(self) -> bool:
        return bool(self.transfer_syntax.is_implicit_VR)

    @property
    def encapsulated(self) -> bool:
        return bool(self.transfer_syntax.is_encapsulated)

    def element(self, tag: int) -> Element:
        return next(e for e in self.elements if e.tag == tag)

    def replace(self, changes: Mapping[int, bytes | None]) -> bytes:
        """The body with some element values replaced (headers re-encoded) or dropped."""
        parts = []
        for e in self.elements:
            if e.tag not in changes:
                parts.append(e.encoded)
            elif (value := changes[e.tag]) is not None:
                parts.append(element_bytes(e.tag, e.vr, value, self.implicit))
        return b"".join(parts)

    def offset(self, tag: int) -> int:
        """Offset of an element's header in :attr:`body`."""
        position = 0
        for e in self.elements:
            if e.tag == tag:
                return position
            position += len(e.encoded)
        raise KeyError(hex(tag))


def element_bytes(
    tag: int, vr: str, value: bytes, implicit: bool, length: int | None = None
) -> bytes:
    """One little-endian element; ``length`` overrides the declared value length."""
    length = len(value) if length is None else length
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHL", group, element, length) + value
    if vr in LONG_VRS:
        return struct.pack("<HH2s2xL", group, element, vr.encode(), length) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), length & 0xFFFF) + value


def make_seeds(slices: int = 1) -> list[Seed]:
    """One seed per syntax in :data:`SEED_SYNTAXES`, each with two small sequences."""
    seeds = []
    for syntax in SEED_SYNTAXES:
        spec = PhantomSpec(
            rows=32,
            columns=32,
            slices=slices,
            pixel_spacing=(10.0, 10.0),
            n_lesions=0,
            transfer_syntax=syntax,
        )
        ds, *others = generate_phantom(spec).datasets
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "X1", "99FUZZ", "Fuzz"
        ds.ProcedureCodeSequence = [code]  # defined length
        ref = Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = "1.2.3.4"
        ds.ReferencedImageSequence = [ref]
        ds["ReferencedImageSequence"].is_undefined_length = True
        seeds.append(_seed(ds, UID(syntax), tuple(others)))
    return seeds


def _seed(ds: Dataset, syntax: UID, others: tuple[Dataset, ...]) -> Seed:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = syntax.is_implicit_VR
    elements = []
    for elem in ds:
        start = fp.tell()
        write_data_element(fp, elem)
        encoded = fp.getvalue()[start:]
        header = 8 if syntax.is_implicit_VR or elem.VR not in LONG_VRS else 12
        elements.append(Element(elem.tag, elem.VR, encoded, header))
    seed = Seed(syntax, tuple(elements), str(ds.SOPInstanceUID), ds, others)
    written = io.BytesIO()
    dcmwrite(written, ds, enforce_file_format=True)
    assert written.getvalue().endswith(seed.body), "element-wise encoding differs from pydicom's"
    return seed


def write_instance(path: Path, body: bytes, *, sop_instance_uid: str, syntax: str) -> Path:
    """A Part 10 file whose meta names a CT instance and whose dataset is ``body`` verbatim."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)  # type: ignore[arg-type]
        f.write(body)
    return path


# --- sending raw datasets ------------------------------------------------------------------


class RawStoreClient:
    """C-STOREs dataset bytes unchanged on one association, opening a new one after an abort.

    pynetdicom's chunked mode sends the bytes after a file's meta as they are, with the
    Affected SOP Class/Instance UIDs taken from the meta.
    """

    def __init__(self, port: int, folder: Path) -> None:
        self.port = port
        self.path = folder / "case.dcm"
        folder.mkdir(parents=True, exist_ok=True)
        self.assoc: Association | None = None
        self.aborts = 0

    def _associate(self) -> Association:
        ae = AE(ae_title=FUZZ_AE)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = SEND_TIMEOUT_S
        ae.connection_timeout = SEND_TIMEOUT_S
        for syntax in SEED_SYNTAXES:
            ae.add_requested_context(CTImageStorage, syntax)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
        assert assoc.is_established, "the node refused an association"
        sock = getattr(assoc.dul.socket, "socket", None)
        if sock is not None:  # without it each C-STORE waits ~40 ms for a delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keep_stray_responses(assoc)  # else about 1 in 1,000 sends stalls (pynetdicom race)
        return assoc

    def store(self, body: bytes, *, syntax: str, sop_instance_uid: str) -> int | None:
        """The status the node answered, or None when the association ended instead."""
        write_instance(self.path, body, sop_instance_uid=sop_instance_uid, syntax=syntax)
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self._associate()
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        start = time.monotonic()
        try:
            rsp = self.assoc.send_c_store(self.path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
        elapsed = time.monotonic() - start
        assert elapsed < SEND_TIMEOUT_S, f"hang: the C-STORE took {elapsed:.1f} s"
        code = int(rsp.Status) if "Status" in rsp else None
        if code is None or not self.assoc.is_established:
            self.aborts += 1
            self.close()
        return code

    def close(self) -> None:
        if self.assoc is not None:
            if self.assoc.is_established:
                self.assoc.release()
            self.assoc = None


# --- raw sockets (PDU level) -------------------------------------------------------------


def associate_rq(called: str = NODE_AE, calling: str = FUZZ_AE) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification and CT Image Storage (PS3.8 9.3.2)."""

    def item(kind: int, payload: bytes) -> bytes:
        return struct.pack(">BxH", kind, len(payload)) + payload

    def context(context_id: int, abstract: str) -> bytes:
        syntaxes = item(0x40, ExplicitVRLittleEndian.encode()) + item(
            0x40, ImplicitVRLittleEndian.encode()
        )
        return item(
            0x20, struct.pack(">B3x", context_id) + item(0x30, abstract.encode()) + syntaxes
        )

    variable = (
        item(0x10, b"1.2.840.10008.3.1.1.1")
        + context(1, "1.2.840.10008.1.1")
        + context(3, CTImageStorage)
        + item(0x50, item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.3.4.5"))
    )
    fixed = struct.pack(">H2x16s16s32x", 1, called.ljust(16).encode(), calling.ljust(16).encode())
    body = fixed + variable
    return struct.pack(">BxL", 0x01, len(body)) + body


def read_pdu(sock: socket.socket, deadline: float) -> bytes:
    """One whole PDU from ``sock`` (b"" when the peer closed first)."""
    header = _read_exactly(sock, 6, deadline)
    if len(header) < 6:
        return header
    (length,) = struct.unpack(">L", header[2:])
    return header + _read_exactly(sock, length, deadline)


def _read_exactly(sock: socket.socket, count: int, deadline: float) -> bytes:
    data = b""
    while len(data) < count:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(count - len(data))
        except TimeoutError:
            raise AssertionError(f"hang: the node sent nothing for {SEND_TIMEOUT_S} s") from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return data


def wait_closed(sock: socket.socket, timeout: float = SEND_TIMEOUT_S) -> bytes:
    """Read until the node closes the connection; returns what it sent meanwhile."""
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"hang: the node kept the connection open for {timeout:.0f} s"
            ) from None
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


# --- crashes and liveness ----------------------------------------------------------------

UPSTREAM_LOGGING_HANDLER = "event handler 'standard_"
UPSTREAM_STATE_MACHINE = "State Machine received an exception"
CRASH_MARKERS = ("Exception in", "Exception raised in")


class CrashWatch(logging.Handler):
    """Collects log lines and thread deaths that mean an exception escaped the node's code.

    Two kinds of pynetdicom errors are counted apart, as upstream bugs that the node
    contains: its own PDU-logging handlers failing on odd PDUs (pynetdicom catches those),
    and its state machine raising on odd PDUs (``dicomnode.net.patches`` ends the
    association in one warning line; an uncontained one would kill a thread, a crash).
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.crashes: list[str] = []
        self.upstream: list[str] = []
        self.contained: list[str] = []
        self._previous_hook = threading.excepthook

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name == "dicomnode.net.patches":
            self.contained.append(message)
        if record.levelno < logging.ERROR:
            return
        if UPSTREAM_LOGGING_HANDLER in message or UPSTREAM_STATE_MACHINE in message:
            self.upstream.append(message)
            return
        ours = record.name.startswith("dicomnode") and record.exc_info is not None
        if ours or any(marker in message for marker in CRASH_MARKERS):
            self.crashes.append(f"{record.name}: {message}")

    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        self.crashes.append(f"thread {name} died: {args.exc_type.__name__}: {args.exc_value}")

    def __enter__(self) -> CrashWatch:
        for name in ("pynetdicom", "dicomnode"):
            logging.getLogger(name).addHandler(self)
        threading.excepthook = self._thread_died
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for name in ("pynetdicom", "dicomnode"):
            logging.getLogger(name).removeHandler(self)
        threading.excepthook = self._previous_hook

    def assert_none(self) -> None:
        assert self.crashes == [], f"{len(self.crashes)} crash(es): {self.crashes[:5]}"


@contextmanager
def watching(tally: Tally | None = None) -> Iterator[CrashWatch]:
    """Fail on any crash in the block; count the contained upstream errors in ``tally``."""
    with CrashWatch() as watch:
        yield watch
    if tally is not None:
        for kind, lines in (("upstream log", watch.upstream), ("guard", watch.contained)):
            for line in lines:
                tally.add("pynetdicom errors contained", f"{kind}: {_kind(line)}")
    watch.assert_none()


def _kind(line: str) -> str:
    """A log line without its variable parts (numbers, quoted values)."""
    return re.sub(r"'[^']*'|\d+", "…", line)[:90]


def assert_serving(node: Node, valid: Path) -> None:
    """The node's acceptor is alive and it answers C-ECHO and stores a valid instance."""
    assert node.scp._thread is not None and node.scp._thread.is_alive(), "the SCP thread died"
    peer = Peer(NODE_AE, "127.0.0.1", node.port, timeout_s=SEND_TIMEOUT_S)
    assert echo(peer, FUZZ_AE) == status.SUCCESS
    results = send_files(peer, [valid], FUZZ_AE)
    assert [r.status for r in results] == [status.SUCCESS], results


@dataclass
class Tally:
    """Cases and outcomes per category, printed for the report (``pytest -s``)."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, category: str, outcome: Any) -> None:
        if isinstance(outcome, int):
            outcome = f"0x{outcome:04X}"
        self.counts[(category, str(outcome))] += 1

    def cases(self, category: str) -> int:
        return sum(n for (c, _), n in self.counts.items() if c == category)

    def report(self) -> str:
        categories = sorted({c for c, _ in self.counts})
        lines = []
        for c in categories:
            outcomes = {o: n for (cc, o), n in sorted(self.counts.items()) if cc == c}
            lines.append(f"{c}: {self.cases(c)} cases {outcomes}")
        return "\n".join(lines)
