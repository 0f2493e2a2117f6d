"""The shipped models on ONNX Runtime's GPU providers: slices/s by provider and batch size.

For each provider asked for (``cuda``, ``tensorrt``, ``cpu``), in that order: a session of
each shipped bundle (lesion-seg, lesion-cls) is opened with the provider first, and it is
used only if the session really runs on it (``session.get_providers()[0]``: ONNX
Runtime falls back to the CPU without an error when CUDA cannot load).  A provider that is
not usable is reported as such and skipped; the CPU figures are always labelled CPU.

Each model runs batches of (batch, context, size, size) float32 slices, for every batch
size asked for, two ways:

    run()        numpy in, numpy out (the copies to and from the device inside the call)
    io binding   the batch copied to the device as an OrtValue, the output bound on the
                 device and copied back once per batch (what a pipeline needs)

and prints slices/s, min / median / max over ``--repeat`` timed rounds of at least
``--min-slices`` slices each, after warm-up runs (TensorRT builds its engine then: one
optimisation profile for batches 1..max, fp16, cached in a temporary folder).

    python benchmarks/gpu.py                                   # cuda, tensorrt, cpu; 1..64
    python benchmarks/gpu.py --providers cpu --batch-sizes 1 4 16 --repeat 2

benchmarks/gpu.sh installs the project and runs this, then the 300-slice turnaround.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
LABELS = {"cuda": "CUDA fp32", "tensorrt": "TensorRT fp16", "cpu": "CPU fp32"}
MODELS = ("lesion-seg", "lesion-cls")


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    input_name: str
    output_name: str
    context: int


def shipped_models() -> list[Model]:
    from dicomnode.config import builtin_bundle
    from dicomnode.inference.card import load_bundle

    models = []
    for name in MODELS:
        bundle = load_bundle(builtin_bundle(name))
        card = bundle.card
        if card.input.layout != "NCHW":
            raise SystemExit(f"{name}: this benchmark feeds NCHW input, the card says NHWC")
        models.append(
            Model(
                name,
                bundle.model_path,
                card.input.name,
                card.output.name,
                card.input.context_slices,
            )
        )
    return models


# --- providers ---------------------------------------------------------------------------


def preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* pip packages, where ONNX Runtime can do it."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None and driver_present():
        try:
            preload()
        except Exception as exc:  # a missing library shows up when the session opens
            print(f"note: onnxruntime.preload_dlls() failed: {exc}")


def driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def provider_entry(name: str, batch_max: int, size: int, model: Model, cache: Path) -> Any:
    """The providers list for a session: the provider with its options, then the CPU."""
    if name == "cpu":
        return [PROVIDERS["cpu"]]
    if name == "cuda":
        return [(PROVIDERS["cuda"], {"device_id": 0}), PROVIDERS["cpu"]]
    shape = f"{model.context}x{size}x{size}"
    options = {
        "device_id": 0,
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_profile_min_shapes": f"{model.input_name}:1x{shape}",
        "trt_profile_opt_shapes": f"{model.input_name}:{min(16, batch_max)}x{shape}",
        "trt_profile_max_shapes": f"{model.input_name}:{batch_max}x{shape}",
    }
    return [
        (PROVIDERS["tensorrt"], options),
        (PROVIDERS["cuda"], {"device_id": 0}),
        PROVIDERS["cpu"],
    ]


def open_session(name: str, model: Model, batch_max: int, size: int, cache: Path) -> Any:
    """A session that runs on provider ``name``, or None (with the reason printed)."""
    import onnxruntime as ort

    from dicomnode.inference.runner import session_options

    if name != "cpu":
        if PROVIDERS[name] not in ort.get_available_providers():
            print(f"  {LABELS[name]}: not in this onnxruntime build ({ort.__version__}); skipped")
            return None
        if not driver_present():
            print(f"  {LABELS[name]}: no NVIDIA driver (libcuda.so.1) on this machine; skipped")
            return None
    options = session_options()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(model.path), options, providers=provider_entry(name, batch_max, size, model, cache)
        )
    except Exception as exc:
        print(f"  {LABELS[name]}: session cannot open ({exc}); skipped")
        return None
    active = session.get_providers()
    if active[0] != PROVIDERS[name]:
        print(f"  {LABELS[name]}: the session fell back to {active[0]}; skipped")
        return None
    return session


# --- timing ------------------------------------------------------------------------------


def device_of(name: str) -> str:
    return "cpu" if name == "cpu" else "cuda"


def runner_plain(session: Any, model: Model, x: np.ndarray) -> Callable[[], None]:
    def run() -> None:
        session.run([model.output_name], {model.input_name: x})

    return run


def runner_bound(session: Any, model: Model, x: np.ndarray, device: str) -> Callable[[], None]:
    import onnxruntime as ort

    def run() -> None:
        binding = session.io_binding()
        value = ort.OrtValue.ortvalue_from_numpy(x, device, 0)  # host -> device, per batch
        binding.bind_ortvalue_input(model.input_name, value)
        binding.bind_output(model.output_name, device)
        session.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()  # device -> host, per batch

    return run


def slices_per_second(
    run: Callable[[], None], batch: int, min_slices: int, repeat: int, warm: int
) -> list[float]:
    for _ in range(warm):
        run()
    calls = max(1, -(-min_slices // batch))
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        rates.append(calls * batch / (time.perf_counter() - started))
    return rates


def fmt(rates: list[float]) -> str:
    return f"{min(rates):8.1f} {statistics.median(rates):8.1f} {max(rates):8.1f}"


def sweep(name: str, args: argparse.Namespace, models: list[Model], cache: Path) -> None:
    print(f"\n{LABELS[name]} ({PROVIDERS[name]}), slices/s, min / median / max of {args.repeat}")
    batch_max = max(args.batch_sizes)
    for model in models:
        session = open_session(name, model, batch_max, args.size, cache)
        if session is None:
            return
        print(f"  {model.name}: {'batch':>5} {'run()':>26}   {'io binding':>26}")
        rng = np.random.default_rng(0)
        for batch in args.batch_sizes:
            x = rng.random((batch, model.context, args.size, args.size), dtype=np.float32)
            plain = slices_per_second(
                runner_plain(session, model, x), batch, args.min_slices, args.repeat, args.warm
            )
            bound = slices_per_second(
                runner_bound(session, model, x, device_of(name)),
                batch,
                args.min_slices,
                args.repeat,
                args.warm,
            )
            print(f"  {'':{len(model.name)}}  {batch:5d} {fmt(plain)}   {fmt(bound)}")


def describe_machine() -> None:
    import onnxruntime as ort

    from dicomnode.inference.runner import cpu_count

    print(f"python {platform.python_version()}, onnxruntime {ort.__version__} ({ort.get_device()})")
    print(f"available providers: {', '.join(ort.get_available_providers())}")
    print(
        f"CPUs for this process: {cpu_count()}; "
        f"NVIDIA driver: {'yes' if driver_present() else 'no'}"
    )
    if shutil.which("nvidia-smi"):
        query = [
            "nvidia-smi",
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader",
        ]
        gpus = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
        print(f"GPU: {gpus or 'nvidia-smi found no GPU'}")
    else:
        print("GPU: none (no nvidia-smi)")


def check_cuda() -> bool:
    """Does a session of the segmentation model run on CUDA?  Prints the answer."""
    import onnxruntime as ort

    if not driver_present() or PROVIDERS["cuda"] not in ort.get_available_providers():
        print("CUDA check: NO CUDA here (no driver or a CPU-only onnxruntime); CPU figures only")
        return False
    model = shipped_models()[0]
    session = ort.InferenceSession(str(model.path), providers=[PROVIDERS["cuda"], PROVIDERS["cpu"]])
    providers = session.get_providers()
    ok = providers[0] == PROVIDERS["cuda"]
    print(f"CUDA check: session.get_providers() = {providers} -> {'OK' if ok else 'FELL BACK'}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--size", type=int, default=256, help="slice size the models see (256)")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per point")
    ap.add_argument("--min-slices", type=int, default=256, help="slices per timed round")
    ap.add_argument("--warm", type=int, default=3, help="untimed runs per point first")
    ap.add_argument("--require-cuda", action="store_true", help="exit 1 when CUDA is not usable")
    args = ap.parse_args()
    preload_cuda_libraries()
    describe_machine()
    cuda = check_cuda()
    models = shipped_models()
    with tempfile.TemporaryDirectory(prefix="dicomnode-trt-") as cache:
        for name in args.providers:
            sweep(name, args, models, Path(cache))
    if args.require_cuda and not cuda:
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    main()
