"""Malformed datasets over a real association: a failure status every time, never a crash.

Each test mutates small valid CT instances (four transfer syntaxes, with a defined- and an
undefined-length sequence) with hypothesis, C-STOREs the bytes unchanged and checks the
status the node answers.  The node must refuse (0xC210 or 0xA900) whatever is truncated,
structurally corrupt, lacks or garbles an identifying UID, or has less pixel data than its
header declares; it must accept (0x0000) what is structurally sound even where a value is
nonsense (a DS of letters): the handler does not decode, the job reports such content.
Every 50 cases and at the end, the node must answer C-ECHO and store a valid instance, and
no exception may have escaped a handler or thread.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.uid import CTImageStorage

from dicomnode.app.node import Node
from dicomnode.net import status

from .harness import (
    LIVENESS_EVERY,
    REFUSED,
    RawStoreClient,
    Seed,
    Tally,
    assert_serving,
    element_bytes,
    fuzz_settings,
    watching,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SOP_CLASS, SOP_INSTANCE, STUDY, SERIES = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E
KEY_UIDS = (SOP_CLASS, SOP_INSTANCE, STUDY, SERIES)
ROWS, COLUMNS, BITS_ALLOCATED = 0x00280010, 0x00280011, 0x00280100
US_TAGS = (ROWS, COLUMNS, BITS_ALLOCATED, 0x00280002, 0x00280101, 0x00280102, 0x00280103)
DS_IS_TAGS = (0x00280030, 0x00180050, 0x00200032, 0x00200037, 0x00281052, 0x00281053, 0x00200013)
PIXEL_DATA = 0x7FE00010
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_ITEM, _SEQUENCE_DELIMITER = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


class Campaign:
    """Counts the cases of one category and checks the node's liveness every so often."""

    def __init__(self, category: str, node: Node, valid: Path, tally: Tally) -> None:
        self.category, self.node, self.valid, self.tally = category, node, valid, tally
        self.cases = 0
        self.refused = 0

    def record(self, code: int | None) -> None:
        self.cases += 1
        self.refused += code in REFUSED
        self.tally.add(self.category, "abort" if code is None else code)
        if self.cases % LIVENESS_EVERY == 0:
            assert_serving(self.node, self.valid)

    def finish(self, minimum: int) -> None:
        assert self.cases >= minimum, f"only {self.cases} cases ran"
        assert_serving(self.node, self.valid)
        assert self.node.scp.counters.failed == self.refused


def _padded(value: bytes) -> bytes:
    return value + b"\0" * (len(value) % 2)


def _send(client: RawStoreClient, seed: Seed, body: bytes) -> int | None:
    return client.store(body, syntax=seed.transfer_syntax, sop_instance_uid=seed.sop_instance_uid)


def _fragments(seed: Seed) -> list[bytes]:
    """The item values of a seed's encapsulated Pixel Data (offset table first)."""
    value, items = seed.element(PIXEL_DATA).value, []
    position = 0
    while value[position : position + 4] == _ITEM:
        (length,) = struct.unpack_from("<L", value, position + 4)
        items.append(value[position + 8 : position + 8 + length])
        position += 8 + length
    return items


def _encapsulated(items: list[bytes], delimiter: bool = True) -> bytes:
    value = b"".join(_ITEM + struct.pack("<L", len(i)) + i for i in items)
    return value + (_SEQUENCE_DELIMITER + b"\0" * 4 if delimiter else b"")


def _with_pixel_value(seed: Seed, value: bytes) -> bytes:
    """The seed's body with Pixel Data of undefined length holding ``value``."""
    header = struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF)
    return seed.body[: seed.offset(PIXEL_DATA)] + header + value


CampaignFactory = Callable[[str], Campaign]


@pytest.fixture
def campaign(fuzz_node: Node, valid_file: Path, tally: Tally) -> CampaignFactory:
    return lambda category: Campaign(category, fuzz_node, valid_file, tally)


def test_truncated_datasets_are_refused(
    client: RawStoreClient, seeds: list[Seed], campaign: CampaignFactory
) -> None:
    run = campaign("truncated")

    # Given valid instances cut short anywhere: inside an element or between two
    @fuzz_settings(max_examples=200)
    @given(seed=st.sampled_from(seeds), data=st.data())
    def case(seed: Seed, data: st.DataObject) -> None:
        body = seed.body
        boundaries = [seed.offset(e.tag) for e in seed.elements]
        cut = data.draw(
            st.one_of(st.integers(0, len(body) - 1), st.sampled_from(boundaries)), label="cut"
        )
        # When each is sent
        code = _send(client, seed, body[:cut])
        run.record(code)
        # Then the node refuses it (or aborts), whatever the cut
        assert code in REFUSED or code is None, f"0x{code:04X} for a cut at {cut}/{len(body)}"

    with watching(run.tally):
        case()
        run.finish(200)


def test_wrong_value_representations(
    client: RawStoreClient, seeds: list[Seed], campaign: CampaignFactory
) -> None:
    run = campaign("wrong VR")
    garbage = st.binary(min_size=0, max_size=80)
    uid_text = st.one_of(
        st.text(alphabet="0123456789.", min_size=0, max_size=80),
        st.text(alphabet="0123456789.abcXYZ -_\x00/\\", min_size=1, max_size=70),
    )

    @fuzz_settings(max_examples=250)
    @given(seed=st.sampled_from(seeds), kind=st.integers(0, 4), data=st.data())
    def case(seed: Seed, kind: int, data: st.DataObject) -> None:
        # Given an instance with one value that breaks its VR
        if kind == 0:  # an identifying UID with letters, empty components, too long ...
            tag = data.draw(st.sampled_from(KEY_UIDS), label="tag")
            text = data.draw(uid_text, label="uid")
            value = _padded(text.encode())
            body = seed.replace({tag: value})
            stripped = value.rstrip(b"\0 ").lstrip(b" ").decode()
            valid = len(stripped) <= 64 and _UID.match(stripped) is not None
            expected_uid = {SOP_CLASS: CTImageStorage, SOP_INSTANCE: seed.sop_instance_uid}
            must_refuse = not valid or stripped != expected_uid.get(tag, stripped)
        elif kind == 1:  # a US of the wrong length (odd, empty, several values)
            tag = data.draw(st.sampled_from(US_TAGS), label="tag")
            value = data.draw(st.binary(min_size=0, max_size=7), label="value")
            body = seed.replace({tag: value})
            pixel_module = tag in (ROWS, COLUMNS, BITS_ALLOCATED) and len(value) != 2
            must_refuse = len(value) % 2 == 1 or pixel_module
        elif kind == 2:  # DS / IS values that are no numbers
            tag = data.draw(st.sampled_from(DS_IS_TAGS), label="tag")
            body = seed.replace({tag: data.draw(garbage, label="value")})
            must_refuse = False
        elif kind == 3:  # a UID that is not identifying, with letters
            body = seed.replace({0x00200052: _padded(data.draw(uid_text).encode())})
            must_refuse = False
        else:  # the VR field itself replaced (explicit VR only)
            index = data.draw(st.integers(1, len(seed.elements) - 1), label="element")
            vr = data.draw(st.binary(min_size=2, max_size=2), label="vr")
            encoded = bytearray(seed.body)
            position = seed.offset(seed.elements[index].tag)
            if not seed.implicit:
                encoded[position + 4 : position + 6] = vr
            body = bytes(encoded)
            must_refuse = False  # a known VR of the same length form can still parse
        # When it is sent
        code = _send(client, seed, body)
        run.record(code)
        # Then a broken identifying UID or a US of the wrong size is refused, and anything
        # else gets a status (never a crash)
        if must_refuse:
            assert code in REFUSED or code is None, f"0x{code:04X}"
        else:
            assert code in REFUSED | {status.SUCCESS} or code is None

    with watching(run.tally):
        case()
        run.finish(250)


def test_values_that_are_no_numbers_are_accepted(
    client: RawStoreClient, seeds: list[Seed], campaign: CampaignFactory
) -> None:
    """The receive policy: value content is the job's business, not the handler's."""
    run = campaign("DS garbage accepted")

    @fuzz_settings(max_examples=40)
    @given(
        seed=st.sampled_from(seeds),
        tag=st.sampled_from(DS_IS_TAGS),
        value=st.binary(min_size=0, max_size=64),
    )
    def case(seed: Seed, tag: int, value: bytes) -> None:
        code = _send(client, seed, seed.replace({tag: value}))
        run.record(code)
        assert code == status.SUCCESS

    with watching(run.tally):
        case()
        run.finish(40)


def test_missing_identifying_uids_are_refused(
    client: RawStoreClient, seeds: list[Seed], campaign: CampaignFactory
) -> None:
    run = campaign("missing UID")

    @fuzz_settings(max_examples=60)
    @given(
        seed=st.sampled_from(seeds),
        tags=st.sets(st.sampled_from(KEY_UIDS), min_size=1),
        blank=st.sampled_from([None, b"", b"  ", b"\0\0"]),
    )
    def case(seed: Seed, tags: set[int], blank: bytes | None) -> None:
        # Given an instance without some of its identifying UIDs (absent or empty)
        body = seed.replace(dict.fromkeys(tags, blank))
        # When it is sent
        code = _send(client, seed, body)
        run.record(code)
        # Then it is refused
        assert code in REFUSED or code is None

    with watching(run.tally):
        case()
        run.finish(60)


def test_pixel_data_shorter_than_declared_is_refused(
    client: RawStoreClient, seeds: list[Seed], campaign: CampaignFactory
) -> None:
    run = campaign("short pixel data")
    native = [s for s in seeds if not s.encapsulated]
    encapsulated = [s for s in seeds if s.encapsulated]

    @fuzz_settings(max_examples=100)
    @given(data=st.data(), native_case=st.booleans())
    def case(data: st.DataObject, native_case: bool) -> None:
        if native_case:
            seed = data.draw(st.sampled_from(native))
            pixels = seed.element(PIXEL_DATA)
            keep = data.draw(st.integers(0, len(pixels.value) - 1), label="keep")
            declared = data.draw(
                st.sampled_from([keep, len(pixels.value)]), label="declared length"
            )
            # Given Pixel Data with fewer bytes than Rows x Columns x Bits Allocated needs,
            # its element length either telling the truth or still the full size
            header = element_bytes(PIXEL_DATA, "OW", b"", seed.implicit, length=declared)
            body = seed.body[: seed.offset(PIXEL_DATA)] + header + pixels.value[:keep]
        else:
            seed = data.draw(st.sampled_from(encapsulated))
            items = _fragments(seed)
            how = data.draw(st.integers(0, 3), label="damage")
            # Given encapsulated Pixel Data without its delimiter, without fragments, with a
            # fragment longer than what follows, or cut inside a fragment
            if how == 0:
                value = _encapsulated(items, delimiter=False)
            elif how == 1:
                value = _encapsulated(items[:1])
            elif how == 2:
                longer = data.draw(st.integers(len(items[1]) + 1, len(items[1]) + 10_000))
                value = _encapsulated(items)
                at = 8 + len(items[0]) + 4
                value = value[:at] + struct.pack("<L", longer) + value[at + 4 :]
            else:
                full = _encapsulated(items)
                value = full[: data.draw(st.integers(0, len(full) - 9), label="cut")]
            body = _with_pixel_value(seed, value)
        # When it is sent
        code = _send(client, seed, body)
        run.record(code)
        # Then it is refused
        assert code in REFUSED or code is None

    with watching(run.tally):
        case()
        run.finish(100)


def test_two_gigabyte_declared_lengths_are_refused(
    client: RawStoreClient, seeds: list[Seed], campaign: CampaignFactory
) -> None:
    run = campaign("2 GB length")
    huge = st.one_of(
        st.sampled_from([0x7FFFFFFF, 0x80000000, 0xFFFFFFFE]),
        st.integers(0x80000000, 0xFFFFFFFE),
    )

    @fuzz_settings(max_examples=80)
    @given(seed=st.sampled_from(seeds), data=st.data(), length=huge)
    def case(seed: Seed, data: st.DataObject, length: int) -> None:
        # Given an element (or a sequence item, or a fragment) declaring ~2-4 GB
        where = data.draw(st.sampled_from(["element", "item", "fragment"]), label="where")
        if where == "element":
            e = data.draw(st.sampled_from(seed.elements), label="element")
            vr = e.vr if e.vr in ("OB", "OW", "SQ", "UN", "UT") else "UN"
            header = element_bytes(e.tag, vr, b"", seed.implicit, length=length)
            position = seed.offset(e.tag)
            body = seed.body[:position] + header + e.value[:64]
        elif where == "item":
            sequence = seed.element(0x00081140)  # undefined length: items follow the header
            at = seed.offset(sequence.tag) + sequence.header_length + 4
            body = seed.body[:at] + struct.pack("<L", length) + seed.body[at + 4 :]
        else:
            items = _fragments(seed) if seed.encapsulated else [b"", b"\0" * 64]
            value = _encapsulated(items)
            at = 8 + len(items[0]) + 4
            body = _with_pixel_value(seed, value[:at] + struct.pack("<L", length) + value[at + 4 :])
        # When it is sent
        code = _send(client, seed, body)
        run.record(code)
        # Then it is refused at once (no attempt to read or allocate the length)
        assert code in REFUSED or code is None

    with watching(run.tally):
        case()
        run.finish(80)


def test_undecodable_compressed_pixel_data_is_accepted(
    client: RawStoreClient, seeds: list[Seed], campaign: CampaignFactory
) -> None:
    """The handler does not decode: garbage inside well-formed fragments is stored."""
    run = campaign("undecodable fragments accepted")
    encapsulated = [s for s in seeds if s.encapsulated]

    @fuzz_settings(max_examples=60)
    @given(
        seed=st.sampled_from(encapsulated),
        fragment=st.binary(min_size=1, max_size=3000).map(_padded),
    )
    def case(seed: Seed, fragment: bytes) -> None:
        # Given encapsulated Pixel Data whose one fragment is random bytes
        body = _with_pixel_value(seed, _encapsulated([b"", fragment]))
        # When it is sent
        code = _send(client, seed, body)
        run.record(code)
        # Then it is acknowledged (the job, not the handler, finds it undecodable)
        assert code == status.SUCCESS

    with watching(run.tally):
        case()
        run.finish(60)


def test_random_mutations_get_a_status(
    client: RawStoreClient,
    seeds: list[Seed],
    campaign: CampaignFactory,
    fuzz_node: Node,
) -> None:
    run = campaign("random mutation")
    edit = st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=0, max_size=16))

    @fuzz_settings(max_examples=200)
    @given(
        seed=st.sampled_from(seeds),
        edits=st.lists(st.tuples(edit, st.integers(0, 16)), min_size=1, max_size=8),
    )
    def case(seed: Seed, edits: list[tuple[tuple[float, bytes], int]]) -> None:
        # Given an instance with a few byte ranges overwritten, inserted or deleted
        body = bytearray(seed.body)
        for (where, new), removed in edits:
            at = int(where * len(body))
            body[at : at + removed] = new
        # When it is sent
        code = _send(client, seed, bytes(body))
        run.record(code)
        # Then it gets a status; what is accepted is stored exactly as sent
        assert code in REFUSED | {status.SUCCESS} or code is None
        if code == status.SUCCESS:
            # (acknowledged once in the receive log; spooled and indexed right after)
            assert fuzz_node.spool.spooled_all(10.0)
            versions = fuzz_node.index.instance_versions(seed.sop_instance_uid)
            assert any(v.path.read_bytes().endswith(bytes(body)) for v in versions)

    with watching(run.tally):
        case()
        run.finish(200)


def test_random_bytes_as_dataset_are_refused(
    client: RawStoreClient, seeds: list[Seed], campaign: CampaignFactory
) -> None:
    run = campaign("random dataset")

    @fuzz_settings(max_examples=60)
    @given(seed=st.sampled_from(seeds), body=st.binary(min_size=0, max_size=4096))
    def case(seed: Seed, body: bytes) -> None:
        code = _send(client, seed, body)
        run.record(code)
        assert code in REFUSED or code is None

    with watching(run.tally):
        case()
        run.finish(60)


def _nested(depth: int, implicit: bool) -> bytes:
    """A Content Sequence nested ``depth`` levels deep, every length undefined."""
    if implicit:
        opening = struct.pack("<HHL", 0x0040, 0xA730, 0xFFFFFFFF)
    else:
        opening = struct.pack("<HH2s2xL", 0x0040, 0xA730, b"SQ", 0xFFFFFFFF)
    item, item_end = _ITEM + b"\xff" * 4, b"\xfe\xff\x0d\xe0" + b"\0" * 4
    sequence_end = _SEQUENCE_DELIMITER + b"\0" * 4
    return (opening + item) * depth + (item_end + sequence_end) * depth


@pytest.mark.parametrize("depth", [20, 65, 100_000])
def test_deeply_nested_sequences(
    depth: int, client: RawStoreClient, seeds: list[Seed], campaign: CampaignFactory
) -> None:
    run = campaign("nested sequences")
    with watching(run.tally):
        for seed in seeds:
            # Given an instance with a sequence nested 20, 65 or 100,000 levels deep
            before = seed.offset(PIXEL_DATA)
            body = seed.body[:before] + _nested(depth, seed.implicit) + seed.body[before:]
            # When it is sent
            code = _send(client, seed, body)
            run.record(code)
            # Then 20 levels (a deep SR tree) are fine and more than 64 are refused,
            # without a recursion error or a hang
            assert code == (status.SUCCESS if depth <= 64 else status.ERROR_CANNOT_UNDERSTAND)
        run.finish(len(seeds))
