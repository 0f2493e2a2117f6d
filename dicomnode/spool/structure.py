"""Structural check of an encoded dataset, without decoding any value (PS3.5 7.1, 7.5, A.4).

pydicom is lenient on purpose: a value cut short is returned short, an element header cut
short ends the dataset quietly.  That is right for reading files, wrong for deciding whether
to acknowledge a C-STORE: a file truncated on the sender's disk would be acknowledged and
lost.  :func:`check_structure` walks the element headers (and the items of sequences and of
encapsulated Pixel Data) and refuses, with :class:`InvalidInstanceError`, a dataset that

- ends inside an element header, a value, an item or a sequence (truncated);
- declares a value length that runs past its container (a 2 GB length, say);
- uses an undefined length where only sequences and encapsulated Pixel Data may;
- has a binary value whose length is not a multiple of its VR's size (US of 3 bytes; in
  implicit VR, where the VR is the dictionary's, only an odd length is refused);
- nests sequences deeper than :data:`MAX_DEPTH`.

The walk reads only headers: its cost grows with the number of elements, not with their
size.  What the values contain (a DS that is not a number) is not checked here; the
imaging layer reports such content when it reads the series.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID

from dicomnode.errors import InvalidInstanceError

#: Deepest sequence nesting accepted (deep SR content trees stay far below it).
MAX_DEPTH = 64

PIXEL_DATA = 0x7FE00010
#: Float Pixel Data, Double Float Pixel Data, Pixel Data Provider URL (JPIP).
OTHER_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x00287FE0})
#: Pixel Data, Float Pixel Data and Double Float Pixel Data: a defined length means native.
NATIVE_PIXEL_TAGS = frozenset({PIXEL_DATA, 0x7FE00008, 0x7FE00009})
_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    b"UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_VALUE_SIZE = {
    "US": 2, "SS": 2, "OW": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "OF": 4, "OL": 4,
    "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8,
}  # fmt: skip


@dataclass(frozen=True)
class Structure:
    """What the walk found at the top level of the dataset.

    ``pixel_data_length`` is the value length of a native Pixel Data, Float Pixel Data or
    Double Float Pixel Data element, None when it is encapsulated or absent; ``has_pixels``
    tells whether any Pixel Data, Float or Double Float Pixel Data or a Pixel Data Provider
    URL is present; ``values`` holds the raw values of the top-level elements asked for.
    """

    has_pixels: bool
    pixel_data_length: int | None
    values: dict[int, bytes]
    little_endian: bool

    def text(self, tag: int) -> str:
        """A string value (UI, IS, CS) without its padding; "" when absent."""
        raw = self.values.get(tag, b"")
        return raw.rstrip(b"\0 ").lstrip(b" ").decode("ascii", "replace")

    def unsigned(self, tag: int) -> int | None:
        """A single US value (VM 1, two bytes); None when absent."""
        raw = self.values.get(tag)
        if raw is None:
            return None
        if len(raw) != 2:
            raise InvalidInstanceError(
                f"({tag >> 16:04X},{tag & 0xFFFF:04X}) must hold one US value, has {len(raw)} bytes"
            )
        return int(struct.unpack("<H" if self.little_endian else ">H", raw)[0])


def split_file_meta(encoded: bytes | memoryview) -> tuple[int, str]:
    """Offset of the dataset after the preamble, ``DICM`` and the group 0002 file meta,
    and the meta's Transfer Syntax UID ("" when it has none)."""
    if encoded[128:132] != b"DICM":
        raise InvalidInstanceError("no DICM prefix before the file meta information")
    position, syntax = 132, ""
    while position + 8 <= len(encoded):
        group, element, vr = struct.unpack_from("<HH2s", encoded, position)
        if group != 0x0002:
            return position, syntax
        if vr in _LONG_VRS:
            if position + 12 > len(encoded):
                break
            (length,) = struct.unpack_from("<L", encoded, position + 8)
            value = position + 12
        else:
            (length,) = struct.unpack_from("<H", encoded, position + 6)
            value = position + 8
        if element == 0x0010:
            syntax = (
                bytes(encoded[value : value + length]).rstrip(b"\0 ").decode("ascii", "replace")
            )
        position = value + length
    if position == len(encoded):
        return position, syntax
    raise InvalidInstanceError("the file meta information is truncated")


class _Walker:
    def __init__(self, data: bytes | memoryview, syntax: UID, wanted: frozenset[int]) -> None:
        self.data = data
        self.wanted = wanted
        self.values: dict[int, bytes] = {}
        self.little = syntax.is_little_endian
        self.explicit = not syntax.is_implicit_VR
        self.endian = "<" if self.little else ">"
        self.has_pixels = False
        self.pixel_data_length: int | None = None

    def _truncated(self, what: str, position: int) -> InvalidInstanceError:
        return InvalidInstanceError(f"the dataset is truncated in {what} at byte {position}")

    def elements(self, position: int, end: int | None, depth: int) -> int:
        """Walk a dataset from ``position`` to ``end`` (or to an item delimiter if None)."""
        limit = len(self.data) if end is None else end
        explicit = self.explicit
        if explicit and position + 6 <= limit:
            # implicit VR under an explicit syntax: pydicom reads it too, so do we
            explicit = bytes(self.data[position + 4 : position + 6]).isalpha()
        unpack = struct.unpack_from
        endian = self.endian
        while True:
            if position == limit and end is not None:
                return position
            if position + 8 > limit:
                raise self._truncated("an element header", position)
            group, element = unpack(endian + "HH", self.data, position)
            tag = group << 16 | element
            if tag == _ITEM_DELIMITER and end is None:
                return position + 8
            if group == 0xFFFE:
                raise InvalidInstanceError(f"unexpected item tag ({group:04X},{element:04X})")
            vr: str | None
            if explicit:
                raw_vr = bytes(self.data[position + 4 : position + 6])
                if raw_vr not in _KNOWN_VRS:
                    raise InvalidInstanceError(
                        f"element ({group:04X},{element:04X}) has an unknown VR {raw_vr!r}"
                    )
                vr = raw_vr.decode("ascii")
                if raw_vr in _LONG_VRS:
                    if position + 12 > limit:
                        raise self._truncated("an element header", position)
                    (length,) = unpack(endian + "L", self.data, position + 8)
                    value = position + 12
                else:
                    (length,) = unpack(endian + "H", self.data, position + 6)
                    value = position + 8
            else:
                (length,) = unpack(endian + "L", self.data, position + 4)
                value = position + 8
                vr = _dictionary_vr(tag)
            if length == _UNDEFINED:
                position = self._undefined(tag, vr, value, depth)
                continue
            if value + length > limit:
                raise InvalidInstanceError(
                    f"element ({group:04X},{element:04X}) declares {length} bytes but only "
                    f"{max(limit - value, 0)} remain: truncated or corrupt"
                )
            size = _VALUE_SIZE.get(vr or "")
            if size is not None and not explicit:
                size = 2  # the dictionary's VR may not be the sender's (UL for US): be lenient
            if size is not None and length % size:
                raise InvalidInstanceError(
                    f"element ({group:04X},{element:04X}) has VR {vr} but a length of {length} "
                    f"bytes, not a multiple of {size}"
                )
            if vr == "SQ" and length:
                self.items(value, value + length, depth + 1, fragments=False)
            if depth == 0:
                if tag in self.wanted:
                    self.values[tag] = bytes(self.data[value : value + length])
                elif tag == PIXEL_DATA or tag in OTHER_PIXEL_TAGS:
                    self.has_pixels = True
                    if tag in NATIVE_PIXEL_TAGS:
                        self.pixel_data_length = length
            position = value + length

    def _undefined(self, tag: int, vr: str | None, value: int, depth: int) -> int:
        """Walk an element of undefined length; returns the offset after its delimiter."""
        if tag == PIXEL_DATA:
            self.has_pixels = self.has_pixels or depth == 0
            return self.items(value, None, depth + 1, fragments=True)
        if vr not in (None, "SQ", "UN"):
            raise InvalidInstanceError(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) with VR {vr} has an undefined length"
            )
        return self.items(value, None, depth + 1, fragments=False)

    def items(self, position: int, end: int | None, depth: int, *, fragments: bool) -> int:
        """Walk the items of a sequence (or the fragments of encapsulated Pixel Data)."""
        if depth > MAX_DEPTH:
            raise InvalidInstanceError(f"sequences are nested deeper than {MAX_DEPTH} levels")
        limit = len(self.data) if end is None else end
        what = "encapsulated Pixel Data" if fragments else "a sequence"
        count = 0
        while True:
            if position == limit and end is not None:
                return position
            if position + 8 > limit:
                raise self._truncated(what, position)
            group, element, length = struct.unpack_from(self.endian + "HHL", self.data, position)
            tag = group << 16 | element
            if tag == _SEQUENCE_DELIMITER and end is None:
                if fragments and count < 2:
                    raise InvalidInstanceError("encapsulated Pixel Data has no fragment")
                return position + 8
            count += 1
            if tag != _ITEM:
                raise InvalidInstanceError(
                    f"{what} has an invalid item tag ({group:04X},{element:04X})"
                )
            start = position + 8
            if length == _UNDEFINED:
                if fragments:
                    raise InvalidInstanceError("a Pixel Data fragment has an undefined length")
                position = self.elements(start, None, depth)
                continue
            if start + length > limit:
                raise InvalidInstanceError(
                    f"an item of {what} declares {length} bytes but only "
                    f"{max(limit - start, 0)} remain: truncated or corrupt"
                )
            if not fragments and length:
                self.elements(start, start + length, depth)
            position = start + length


def _dictionary_vr(tag: int) -> str | None:
    """The VR an implicit VR element has by the dictionary; None when unknown or ambiguous."""
    if tag >> 16 & 1:
        return None  # private: its VR is not in the dictionary
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return vr if len(vr) == 2 else None  # "OB or OW", "US or SS": no size to check


def check_structure(
    encoded: bytes | memoryview, offset: int, syntax: UID, wanted: frozenset[int] = frozenset()
) -> Structure:
    """Walk the dataset that starts at ``offset`` in ``encoded`` and ends with it.

    ``wanted``: tags of top-level elements whose raw values to return (not Pixel Data).
    ``syntax`` must not be deflated: a deflated dataset is left to pydicom and zlib.
    """
    walker = _Walker(encoded, syntax, wanted)
    walker.elements(offset, len(encoded), 0)
    return Structure(walker.has_pixels, walker.pixel_data_length, walker.values, walker.little)
