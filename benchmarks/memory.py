"""Peak resident memory and time per phase of one CT series through the study processor.

For each size, a synthetic 512 x 512 CT phantom is written once; then each repeat runs in a
fresh process: the embedded default configuration's ``lesion`` pipeline (shipped
segmentation + classification bundles) is opened, warmed up, and one series goes through
:meth:`Processor.process_series` as the node's worker runs it.  The phases are timed, and
their peak resident memory is read from the kernel (``VmHWM`` of /proc/self/status, reset
with /proc/self/clear_refs at every phase boundary):

    read            select_stack + load_stack (headers, pixels -> Volume)
    inference       the pipeline's run less its measurements (preprocess + models)
    measurements    connected components and their measurements
    headers         the source headers the SEG and SR reference
    SEG encode      build_segmentation
    SR encode       build_measurement_report
    write           the SEG and SR files (atomic writes)

The ratios are to the study's pixel bytes (rows x columns x slices x 2 bytes).  Memory
before the series, in steps: "baseline" is the process with its libraries imported;
"sessions" what opening the ONNX Runtime sessions and one batch through each model added
(the memory arena a session keeps, sized by its batches); "worker warm-up" what
``Processor.warm_up`` added on top (highdicom's tables of the standard, loaded once per
process; the node's worker does this at start).  "study" is the peak less all of that: the
memory one study costs, the figure the target (<= 2x the pixel bytes) is about.

    .venv/bin/python benchmarks/memory.py --slices 300 1000 --repeat 3
    .venv/bin/python benchmarks/memory.py --slices 300 --repeat 3 --batch 3

``--batch N`` also runs ``dicomnode batch`` N times on the 300-slice folder (wall time and
peak resident memory of the whole command, from the kernel's rusage of the child).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PHASES = (
    "read",
    "inference",
    "measurements",
    "headers",
    "SEG encode",
    "SR encode",
    "write",
    "other",
)
MiB = 1 << 20


# --- kernel counters -------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak() -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# --- phases ----------------------------------------------------------------------------


class PhaseClock:
    """Time and peak RSS per phase; phases nest (an inner one pauses the outer one)."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak: dict[str, int] = defaultdict(int)
        self.started = 0.0

    def _close(self) -> None:
        if self.stack:
            name = self.stack[-1]
            self.seconds[name] += time.perf_counter() - self.started
            self.peak[name] = max(self.peak[name], peak_bytes())

    def _open(self) -> None:
        reset_peak()
        self.started = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._close()
        self.stack.append(name)
        self._open()
        try:
            yield
        finally:
            self._close()
            self.stack.pop()
            self._open()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed


def instrument(clock: PhaseClock, processor: Any, pipeline: Any) -> None:
    """Wrap the processor's steps (module attributes looked up at call time)."""
    import dicomnode.app.processor as proc
    import dicomnode.pipelines.lesion as lesion

    for attr, name in (
        ("select_stack", "read"),
        ("load_stack", "read"),
        ("source_datasets", "headers"),
        ("build_segmentation", "SEG encode"),
        ("build_measurement_report", "SR encode"),
        ("_write", "write"),
    ):
        setattr(proc, attr, clock.wrap(name, getattr(proc, attr)))
    lesion.measure_components = clock.wrap("measurements", lesion.measure_components)  # type: ignore[assignment]
    pipeline.run = clock.wrap("inference", pipeline.run)
    processor._pipelines["lesion"] = pipeline


# --- one run (child process) -------------------------------------------------------------


def _one_batch(pipeline: Any, size: int) -> None:
    """One batch through each model, on soft-tissue slices of the study's size (the whole
    field of view is body, so a segmentation model cropping to the body runs on all of
    it): the memory arena a session keeps is sized by its largest batch."""
    import numpy as np

    from dicomnode.pipelines.lesion import LesionPipeline

    assert isinstance(pipeline, LesionPipeline)
    runners = [pipeline.segmentation, pipeline.classification]
    for runner in runners:
        if runner is None:
            continue
        hu = np.full((runner.batch_size, size, size), 40.0, dtype=np.float32)
        if runner.card.task == "segmentation":
            runner.predict_segmentation(hu, (0.7, 0.7))
        else:
            runner.predict_classification(hu, (0.7, 0.7))


def child(study: Path, out: Path, slices: int, size: int) -> dict[str, Any]:
    import numpy as np  # noqa: F401  (the baseline includes the libraries)
    import onnxruntime  # noqa: F401

    from dicomnode.app.processor import Processor
    from dicomnode.config import default_config_path, load_config
    from dicomnode.outputs.layout import result_files

    baseline = rss_bytes()
    config = load_config(default_config_path())
    processor = Processor(config)
    pipeline = processor.pipeline("lesion")
    _one_batch(pipeline, size)
    sessions = rss_bytes()
    warm_up = getattr(processor, "warm_up", None)  # absent before issue 13: then no warm-up
    if warm_up is not None:
        warm_up()
    warm = rss_bytes()
    clock = PhaseClock()
    instrument(clock, processor, pipeline)
    paths = sorted(study.glob("*.dcm"))
    series = "series"
    reset_peak()
    started = time.perf_counter()
    with clock.phase("other"):
        output = processor.process_series(
            paths, "lesion", result_files(out, series, "lesion"), uid_seed="memory-benchmark"
        )
    wall = time.perf_counter() - started
    return {
        "slices": slices,
        "pixel_bytes": slices * size * size * 2,
        "baseline": baseline,
        "sessions": sessions - baseline,
        "warm": warm - baseline,
        "peak": peak_bytes_overall(clock),
        "wall": wall,
        "seconds": dict(clock.seconds),
        "peaks": dict(clock.peak),
        "seg": str(output.segmentation),
        "findings": len(output.summary["findings"]),
    }


def peak_bytes_overall(clock: PhaseClock) -> int:
    return max(clock.peak.values())


# --- parent ------------------------------------------------------------------------------


def write_study(folder: Path, slices: int, size: int) -> Path:
    import numpy as np

    from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

    spec = PhantomSpec(
        rows=size,
        columns=size,
        slices=slices,
        seed=11,
        pixel_spacing=(0.7, 0.7),
        slice_thickness=1.25,
    )
    phantom = generate_phantom(spec)
    write_phantom(phantom, folder / "study")
    np.save(folder / "truth.npy", phantom.mask)
    return folder / "study"


def seg_dice(seg: Path, study: Path, truth: Path) -> tuple[float, str]:
    """Dice of the written SEG against the phantom's truth, and a digest of its frames."""
    import hashlib

    import numpy as np
    from pydicom import dcmread

    from dicomnode.app.demo import dice, read_seg_mask
    from dicomnode.imaging.series import load_volume

    volume = load_volume(sorted(study.glob("*.dcm")))
    mask = read_seg_mask(seg, list(volume.sop_instance_uids))
    expected = np.load(truth)
    # truth is in generation order; the volume is in slice order (the same for this phantom)
    digest = hashlib.sha256(dcmread(seg).PixelData).hexdigest()[:16]
    return dice(mask, expected), digest


def fmt(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [x / scale for x in xs]
    return (
        f"{min(values):8.{digits}f} {statistics.median(values):8.{digits}f} "
        f"{max(values):8.{digits}f}"
    )


def report(runs: list[dict[str, Any]], dice_value: float, digests: set[str]) -> None:
    first = runs[0]
    pixel = first["pixel_bytes"]
    print(
        f"\n{first['slices']} slices of 512 x 512 ({pixel / MiB:.0f} MiB of pixels), "
        f"{len(runs)} runs; min / median / max"
    )
    print(f"  {'phase':<14} {'seconds':>26}   {'peak RSS (MiB)':>26}   peak / pixel bytes")
    for name in PHASES:
        secs = [r["seconds"].get(name, 0.0) for r in runs]
        peaks = [float(r["peaks"].get(name, 0)) for r in runs]
        if not any(peaks):
            continue
        ratio = statistics.median(peaks) / pixel
        print(f"  {name:<14} {fmt(secs)}   {fmt(peaks, MiB, 0)}   {ratio:5.2f}")
    print(f"  {'whole series':<14} {fmt([r['wall'] for r in runs])}")
    base = [float(r["baseline"]) for r in runs]
    sessions = [float(r["sessions"]) for r in runs]
    warm = [float(r["warm"]) for r in runs]
    extra = [w - s for w, s in zip(warm, sessions, strict=True)]
    peaks = [float(r["peak"]) for r in runs]
    study = [p - b - w for p, b, w in zip(peaks, base, warm, strict=True)]
    print(f"  baseline (interpreter + libraries), MiB:   {fmt(base, MiB, 0)}")
    print(f"  model sessions (opened, one batch), MiB:   {fmt(sessions, MiB, 0)}")
    print(f"  worker warm-up on top of them, MiB:        {fmt(extra, MiB, 0)}")
    print(f"  peak RSS of the worker, MiB:               {fmt(peaks, MiB, 0)}")
    print(f"  peak / pixel bytes:                        {fmt([p / pixel for p in peaks])}")
    print(f"  study (peak - baseline - warm-up), MiB:    {fmt(study, MiB, 0)}")
    print(f"  study / pixel bytes (target <= 2):         {fmt([s / pixel for s in study])}")
    print(
        f"  findings: {sorted({r['findings'] for r in runs})}; Dice vs truth {dice_value:.4f}; "
        f"SEG frames identical in every run: {'yes' if len(digests) == 1 else 'NO'}"
    )


def run_child(study: Path, out: Path, slices: int, size: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(study), str(out), str(slices), str(size)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_batch(study: Path, out: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``dicomnode batch`` on the study."""
    cmd = [sys.executable, "-m", "dicomnode.cli", "batch", "--no-progress", str(study), str(out)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"batch failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slices", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="dicomnode batch runs on 300 slices")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        study, out, slices, size = args.child
        print(json.dumps(child(Path(study), Path(out), int(slices), int(size))))
        return
    for slices in args.slices:
        with tempfile.TemporaryDirectory(prefix="dicomnode-memory-") as tmp:
            folder = Path(tmp)
            study = write_study(folder, slices, args.size)
            runs = [
                run_child(study, folder / f"out{i}", slices, args.size) for i in range(args.repeat)
            ]
            digests = set()
            dice_value = 0.0
            for r in runs:
                dice_value, digest = seg_dice(Path(r["seg"]), study, folder / "truth.npy")
                digests.add(digest)
            report(runs, dice_value, digests)
            if args.batch and slices == 300:
                batch = [run_batch(study, folder / f"batch{i}") for i in range(args.batch)]
                print(
                    f"  dicomnode batch, {args.batch} runs: wall s {fmt([b[0] for b in batch])};"
                    f" peak RSS MiB {fmt([float(b[1]) for b in batch], MiB, 0)}"
                )


if __name__ == "__main__":
    main()
