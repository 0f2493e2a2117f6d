"""``dicomnode demo``: the whole loop on one machine, as a PACS would see it.

Starts the node on a free port with its embedded defaults, starts a local storage SCP
playing the PACS, generates a synthetic CT with lesions of known position and size, sends
it by C-STORE, waits for the results to come back (SEG, heat map, key images, SR), and
prints the findings next to the ground truth with a PNG preview of the segmentation, the
key image of each finding and a PNG of the heat map over its CT.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.app.node import Node
from dicomnode.config import Config, LogLevel, Remote, default_config_path, load_config
from dicomnode.imaging.series import load_volume
from dicomnode.imaging.volume import Pixels, Volume
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.synthetic.phantom import Phantom, PhantomSpec, generate_phantom, write_phantom

log = logging.getLogger(__name__)

PACS_AE = "DEMOPACS"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
#: What the PACS receives for a study with lesions: SEG, heat map, key images, SR.
RESULT_OBJECTS = 4


@dataclass(frozen=True)
class SrFinding:
    tracking_id: str
    measurements: dict[str, tuple[float, str]]


def _walk(items: Any) -> Iterator[Dataset]:
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def read_sr_findings(path: Path) -> list[SrFinding]:
    """Measurement groups of a TID 1500 SR: tracking id and numeric measurements."""
    sr = dcmread(path)
    findings = []
    for item in _walk(sr.get("ContentSequence")):
        name = (
            item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
        )
        if name != "125007":  # Measurement Group
            continue
        tracking, values = "", {}
        for child in item.get("ContentSequence", []):
            concept = child.ConceptNameCodeSequence[0]
            if concept.CodeValue == "112039":  # Tracking Identifier
                tracking = str(child.TextValue)
            elif child.ValueType == "NUM" and "MeasuredValueSequence" in child:
                mv = child.MeasuredValueSequence[0]
                unit = str(mv.MeasurementUnitsCodeSequence[0].CodeValue)
                values[str(concept.CodeMeaning)] = (float(mv.NumericValue), unit)
        findings.append(SrFinding(tracking, values))
    return findings


def read_seg_mask(path: Path, sop_uids: list[str]) -> npt.NDArray[np.bool_]:
    """The union of all segments of a binary SEG on the source grid (slice order given)."""
    seg = dcmread(path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    position = {uid: k for k, uid in enumerate(sop_uids)}
    mask = np.zeros((len(sop_uids), int(seg.Rows), int(seg.Columns)), dtype=bool)
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        mask[position[str(src)]] |= frames[i].astype(bool)
    return mask


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def write_preview(
    hu: Pixels,
    mask: npt.NDArray[np.bool_],
    truth: npt.NDArray[np.bool_],
    path: Path,
) -> int:
    """PNG of the slice with the most lesion: CT (lung window), SEG in red, truth outline."""
    from PIL import Image

    k = int(np.argmax(truth.sum(axis=(1, 2)) + mask.sum(axis=(1, 2))))
    gray = np.clip((hu[k] + 1000.0) / 1400.0, 0, 1) * 255
    rgb = np.stack([gray, gray, gray], axis=-1)
    m = mask[k]
    rgb[m] = 0.45 * rgb[m] + 0.55 * np.array([255, 40, 40])
    t = truth[k]
    edge = t & ~(np.roll(t, 1, 0) & np.roll(t, -1, 0) & np.roll(t, 1, 1) & np.roll(t, -1, 1))
    rgb[edge] = [60, 255, 60]
    img = Image.fromarray(rgb.astype(np.uint8)).resize((hu.shape[2] * 2, hu.shape[1] * 2))
    img.save(path)
    return k


def demo_config(work: Path, pacs_port: int, log_level: LogLevel = "WARNING") -> Config:
    base = load_config(default_config_path())
    node = dataclasses.replace(
        base.node, port=0, data_dir=work / "node", min_free_disk_mb=50, log_level=log_level
    )
    completeness = dataclasses.replace(base.completeness, quiet_period_s=2.0, poll_interval_s=0.2)
    remotes = (Remote("demo-pacs", PACS_AE, "127.0.0.1", pacs_port, 30.0),)
    http = dataclasses.replace(base.http, port=0)
    pipelines = tuple(
        dataclasses.replace(p, heat_maps=True, key_images=True) for p in base.pipelines
    )
    return dataclasses.replace(
        base,
        node=node,
        http=http,
        completeness=completeness,
        remotes=remotes,
        pipelines=pipelines,
    )


def _match(phantom: Phantom, findings: list[SrFinding], summary: list[dict[str, Any]]) -> list[str]:
    rows = []
    voxel = (
        phantom.spec.pixel_spacing[0] * phantom.spec.pixel_spacing[1] * phantom.spec.slice_thickness
    )
    centres = [f["centroid_mm"] for f in summary]
    for i, (lesion, lmask) in enumerate(zip(phantom.lesions, phantom.lesion_masks, strict=True)):
        true_vol = float(lmask.sum()) * voxel
        best, best_d = None, math.inf
        for j, c in enumerate(centres):
            d = math.dist(c, lesion.center_mm)
            if d < best_d:
                best, best_d = j, d
        if best is None or best_d > lesion.radius_mm:
            rows.append(
                f"  lesion {i + 1}: r={lesion.radius_mm:4.1f} mm  volume {true_vol:8.0f} mm3"
                f"  diameter {2 * lesion.radius_mm:5.1f} mm  -> MISSED"
            )
            continue
        f = summary[best]
        sr = next((s for s in findings if s.tracking_id == f["tracking_id"]), None)
        vol = sr.measurements.get("Volume", (f["volume_mm3"], "mm3"))[0] if sr else f["volume_mm3"]
        rows.append(
            f"  lesion {i + 1}: r={lesion.radius_mm:4.1f} mm  volume {true_vol:8.0f} mm3 vs "
            f"{vol:8.0f} mm3  diameter {2 * lesion.radius_mm:5.1f} vs "
            f"{f['longest_diameter_mm']:5.1f} mm  centre off by {best_d:4.1f} mm"
            f"  ({f['tracking_id']}, mean {f['mean_hu']:.0f} HU)"
        )
    return rows


def run_demo(
    work: Path,
    out: TextIO,
    *,
    slices: int = 64,
    size: int = 256,
    seed: int = 7,
    log_level: LogLevel = "WARNING",
) -> bool:
    """Run the demo in ``work``; returns True if SEG and SR came back and overlap the truth."""
    work.mkdir(parents=True, exist_ok=True)
    pacs = FolderSCP(PACS_AE, work / "pacs")
    pacs.start()
    config = demo_config(work, pacs.port, log_level)
    node = Node(config)
    node.start()
    try:
        out.write(
            f"node {config.node.ae_title} listening on 127.0.0.1:{node.port}; "
            f"PACS {PACS_AE} on 127.0.0.1:{pacs.port}\n"
        )
        if node.http is not None:
            out.write(
                f"HTTP on http://127.0.0.1:{node.http.port}/ "
                "(worklist; /jobs, /healthz, /readyz, /metrics)\n"
            )
        spec = PhantomSpec(
            rows=size,
            columns=size,
            slices=slices,
            n_lesions=3,
            seed=seed,
            lesion_radius_mm=(6.0, 12.0),
        )
        phantom = generate_phantom(spec)
        files = write_phantom(phantom, work / "study")
        out.write(
            f"generated a synthetic CT: {slices} slices of {size}x{size}, "
            f"{len(phantom.lesions)} lesions -> {work / 'study'}\n"
        )
        t0 = time.perf_counter()
        results = send_files(Peer(config.node.ae_title, "127.0.0.1", node.port), files, PACS_AE)
        sent = time.perf_counter() - t0
        ok = sum(r.ok for r in results)
        out.write(
            f"C-STORE: {ok}/{len(files)} acknowledged in {sent:.2f} s "
            f"({len(files) / sent:.0f} instances/s)\n"
        )
        out.write(
            f"waiting for the quiet period ({config.completeness.quiet_period_s:.0f} s), "
            "inference and delivery...\n"
        )
        received = pacs.wait_for(RESULT_OBJECTS, timeout=300)
        turnaround = time.perf_counter() - t0 - sent
        if len(received) < RESULT_OBJECTS:
            jobs = node.jobs.list_jobs()
            out.write(
                "FAILED: results did not arrive; jobs: "
                f"{[(j.id, j.state, j.last_error) for j in jobs]}\n"
            )
            return False
        out.write(
            f"SEG, heat map, key images and SR received by the PACS {turnaround:.1f} s after "
            "the last instance (quiet period included)\n"
        )
        return _report(phantom, files, received, node, work, out)
    finally:
        node.stop()
        pacs.stop()


def _show_qido(node: Node, study_uid: str, out: TextIO) -> None:
    """What a web viewer sees: the study's series by QIDO-RS on the node's HTTP port."""
    import json
    import urllib.request

    if node.http is None:
        return
    url = (
        f"http://127.0.0.1:{node.http.port}/dicomweb/studies/{study_uid}/series"
        "?includefield=SeriesDescription&includefield=PerformedProcedureStepStatus"
    )
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            answers = json.loads(response.read())
    except (OSError, ValueError) as exc:
        out.write(f"QIDO-RS query failed: {exc}\n")
        return
    out.write(f"QIDO-RS GET {url.split('?')[0]}:\n")
    for series in answers:
        values = {
            key: (series.get(tag, {}).get("Value") or [""])[0]
            for key, tag in (
                ("modality", "00080060"),
                ("description", "0008103E"),
                ("state", "00400252"),
            )
        }
        state = f"  [{values['state']}]" if values["state"] else ""
        out.write(f"  {values['modality']:<4} {values['description']}{state}\n")


def _report(
    phantom: Phantom, files: list[Path], received: list[Path], node: Node, work: Path, out: TextIO
) -> bool:
    import json

    volume = load_volume(files)
    by_class = {str(dcmread(p, stop_before_pixels=True).SOPClassUID): p for p in received}
    seg_path = by_class.get(SEG_CLASS)
    sr_path = next(p for c, p in by_class.items() if c not in (SEG_CLASS, PM_CLASS, KOS_CLASS))
    assert seg_path is not None
    mask = read_seg_mask(seg_path, list(volume.sop_instance_uids))
    uid_order = {ds.SOPInstanceUID: k for k, ds in enumerate(phantom.datasets)}
    order = [uid_order[u] for u in volume.sop_instance_uids]
    truth = phantom.mask[order]
    d = dice(mask, truth)
    jobs = node.jobs.list_jobs()
    summary = json.loads(jobs[0].summary)["series"][0] if jobs and jobs[0].summary else {}
    findings = read_sr_findings(sr_path)
    out.write(f"\nSEG: {seg_path.name}\nSR:  {sr_path.name}\n")
    out.write(f"Dice of the SEG against the ground truth: {d:.3f}\n")
    out.write("findings (ground truth vs SR):\n")
    for row in _match(phantom, findings, summary.get("findings", [])):
        out.write(row + "\n")
    for c in summary.get("classifications", []):
        out.write(
            f"classification: {c['label']} p={c['probability']:.3f} "
            f"({'positive' if c['positive'] else 'negative'}; truth: positive)\n"
        )
    if jobs and jobs[0].triage_priority:
        out.write(
            f"triage priority: {jobs[0].triage_priority} "
            "(recorded in the job, written into the SR)\n"
        )
    _show_explanations(by_class, volume, work, out)
    _show_qido(node, phantom.datasets[0].StudyInstanceUID, out)
    k = write_preview(volume.pixels, mask, truth, work / "preview.png")
    out.write(f"preview (slice {k}, red = SEG, green = truth outline): {work / 'preview.png'}\n")
    if node.http is not None:
        out.write(
            f"study page (findings, key images, heat map): http://127.0.0.1:{node.http.port}"
            f"/studies/{phantom.datasets[0].StudyInstanceUID}\n"
        )
    return d > 0.5


def _show_explanations(by_class: dict[str, Path], volume: Volume, work: Path, out: TextIO) -> None:
    """The key images (from the KOS) and the heat map (its hottest slice over the CT, as
    the web study page draws it)."""
    from dicomnode.web.render import read_heat_map, read_key_images, render_heat_map

    kos_path, pm_path = by_class.get(KOS_CLASS), by_class.get(PM_CLASS)
    if kos_path is not None:
        out.write(f"key images (KOS {kos_path.name}):\n")
        for line in read_key_images(kos_path):
            out.write(f"  {line}\n")
    if pm_path is None:
        out.write("no heat map came back\n")
        return
    heat = read_heat_map(pm_path)
    k = volume.sop_instance_uids.index(heat.sop_instance_uid)
    (work / "heatmap.png").write_bytes(render_heat_map(volume.source_paths[k], heat))
    out.write(
        f"heat map (Parametric Map {pm_path.name}): {heat.explanation}, "
        f"max {heat.probabilities.max():.2f} on slice {k}: {work / 'heatmap.png'}\n"
    )
