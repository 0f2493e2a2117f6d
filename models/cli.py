"""Command-line entry points the ``dicomnode`` CLI dispatches to.

``dicomnode train RECIPE.toml --data DIR --out RUN`` -> :func:`train_main`,
``dicomnode evaluate MODEL --data DIR --out DIR [--against CURRENT]`` -> :func:`evaluate_main`
(with ``--against``: the gate of :mod:`dicomnode.models.gate`),
``dicomnode export CHECKPOINT --out BUNDLE_DIR`` -> :func:`export_main`,
``dicomnode synth --out DIR`` -> :func:`synthetic_main`.

Importing this module never imports TensorFlow: each command imports what it needs when
it runs, and raises :class:`~dicomnode.errors.MissingExtraError` naming the ``train`` extra
when TensorFlow (or tf2onnx) is not installed.  Each function returns an exit status.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicomnode.errors import MissingExtraError, ModelError

log = logging.getLogger(__name__)


def require_training_extra(*modules: str) -> None:
    """Raise :class:`MissingExtraError` unless TensorFlow (and ``modules``) are importable."""
    for name in ("tensorflow", *modules):
        if importlib.util.find_spec(name) is None:
            raise MissingExtraError("training", "train")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``dicomnode train``: train a model from a recipe on a folder of DICOM + SEG."""
    parser = argparse.ArgumentParser(prog="dicomnode train", description=train_main.__doc__)
    parser.add_argument("recipe", help="recipe TOML file, or the name of a shipped recipe")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        action="append",
        help="folder of image series and DICOM SEG labels; again for more (base data, then "
        "the corrections in the node's data_dir/feedback)",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder to write")
    parser.add_argument(
        "--init-from",
        type=Path,
        metavar="RUN",
        help="fine-tune the model of this earlier run (its folder or .keras file)",
    )
    parser.add_argument(
        "--test-data",
        type=Path,
        help="held-out folder to evaluate on (default: the validation cases)",
    )
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--steps", type=int, help="override the recipe's steps per epoch")
    parser.add_argument("--max-cases", type=int, help="use at most this many cases")
    args = parser.parse_args(argv)
    from dicomnode.models.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    require_training_extra()
    _logging()
    from dicomnode.models.train import train

    info = train(
        recipe,
        args.data[0] if len(args.data) == 1 else args.data,
        args.out,
        test_dir=args.test_data,
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        max_cases=args.max_cases,
        init_from=args.init_from,
    )
    print(json.dumps({"wall_time_s": info["wall_time_s"], **info["headline"]}, indent=1))
    return 0


def _evaluation_target(path: Path, min_area_mm2: float | None) -> tuple[Any, Any]:
    """(predictor, EvalSpec) of a bundle folder (ONNX Runtime) or a training run."""
    from dicomnode.inference.card import CARD_FILE, load_bundle
    from dicomnode.models.evaluate import EvalSpec, OnnxPredictor

    if (path / CARD_FILE).is_file():
        bundle = load_bundle(path)
        card = bundle.card
        min_area = card.metrics.get("min_area_mm2", 0.0) if card.task == "classification" else 0
        spec = EvalSpec(
            task=card.task,
            preprocessing=card.preprocessing,
            context_slices=card.input.context_slices,
            labels=card.labels,
            min_component_volume_mm3=card.min_component_volume_mm3,
            min_area_mm2=min_area_mm2 if min_area_mm2 is not None else min_area,
        )
        return OnnxPredictor(bundle.model_path, card), spec
    require_training_extra()
    import keras

    from dicomnode.models.evaluate import KerasPredictor
    from dicomnode.models.recipe import parse_recipe
    from dicomnode.models.run import RunFiles
    from dicomnode.models.train import eval_spec

    run = RunFiles.locate(path)
    recipe = parse_recipe(run.read_recipe_dict(), source=run.recipe.read_text())
    spec = eval_spec(recipe)
    if min_area_mm2 is not None:
        spec = EvalSpec(**{**spec.__dict__, "min_area_mm2": min_area_mm2})
    model = keras.saving.load_model(run.checkpoint_path(path), compile=False)
    return KerasPredictor(model), spec


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``dicomnode evaluate``: metrics and plots of a bundle or a training run on DICOM + SEG;
    with ``--against CURRENT``, the gate: exit 1 (and a report) when the model is worse
    than CURRENT on any reported metric by more than the tolerance."""
    from dicomnode.models.gate import DEFAULT_TOLERANCE

    parser = argparse.ArgumentParser(prog="dicomnode evaluate", description=evaluate_main.__doc__)
    parser.add_argument(
        "model", type=Path, help="bundle folder (run with ONNX Runtime) or run folder / .keras file"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="folder of image series and DICOM SEG labels"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json and PNGs")
    parser.add_argument(
        "--min-area-mm2",
        type=float,
        help="classification: slices with less (non-zero) lesion are ambiguous",
    )
    parser.add_argument(
        "--against",
        type=Path,
        metavar="CURRENT",
        help="the current bundle (or run): MODEL is a candidate, refused (exit 1) when worse",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"--against: how much worse a metric may be (absolute; default {DEFAULT_TOLERANCE})",
    )
    args = parser.parse_args(argv)
    _logging()
    from dicomnode.models.data import load_cases
    from dicomnode.models.evaluate import evaluate

    predictor, spec = _evaluation_target(args.model, args.min_area_mm2)
    if args.against is None:
        result = evaluate(predictor, load_cases(args.data, spec.labels), spec, args.out)
        print(json.dumps(result["summary"]["headline"], indent=1))
        return 0
    return _gate(args, predictor, spec)


def _gate(args: argparse.Namespace, predictor: Any, spec: Any) -> int:
    """Evaluate the candidate and the current model on the same cases and compare."""
    from dicomnode.models.data import load_cases
    from dicomnode.models.evaluate import evaluate
    from dicomnode.models.gate import compare

    current, current_spec = _evaluation_target(args.against, args.min_area_mm2)
    if (spec.task, [lb.name for lb in spec.labels]) != (
        current_spec.task,
        [lb.name for lb in current_spec.labels],
    ):
        raise ModelError(
            f"{args.model} ({spec.task}: {', '.join(lb.name for lb in spec.labels)}) and "
            f"{args.against} ({current_spec.task}: "
            f"{', '.join(lb.name for lb in current_spec.labels)}) are not comparable"
        )
    cases = load_cases(args.data, spec.labels)
    ours = evaluate(predictor, cases, spec, args.out / "candidate")
    theirs = evaluate(current, cases, current_spec, args.out / "current")
    report = compare(spec.task, ours["summary"], theirs["summary"], args.tolerance)
    document = {
        "candidate": str(args.model),
        "current": str(args.against),
        "data": str(args.data),
        "cases": len(cases),
        **report.to_dict(),
    }
    (args.out / "gate.json").write_text(json.dumps(document, indent=1) + "\n")
    for v in report.verdicts:
        mark = "WORSE" if v.worse else "-" if v.note else "ok"
        delta = "" if v.delta is None else f"{v.delta:+.4f}"
        why = f"  (not gated: {v.note})" if v.note else ""
        print(
            f"{mark:>5}  {v.name:<45} {_fmt(v.candidate):>8} vs {_fmt(v.current):>8}  {delta}{why}"
        )
    if report.accepted:
        print(f"accepted: no metric worse than {args.against} by more than {args.tolerance:g}")
        return 0
    names = ", ".join(v.name for v in report.worse)
    print(
        f"refused: {args.model} is worse than {args.against} on {len(report.worse)} metric(s) "
        f"beyond {args.tolerance:g}: {names} (report: {args.out / 'gate.json'})",
        file=sys.stderr,
    )
    return 1


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def export_main(argv: Sequence[str] | None = None) -> int:
    """``dicomnode export``: tf2onnx export + parity check -> model bundle."""
    parser = argparse.ArgumentParser(prog="dicomnode export", description=export_main.__doc__)
    parser.add_argument("checkpoint", type=Path, help="training run folder or its .keras file")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument(
        "--tolerance", type=float, help="max abs TF-vs-ONNX difference (default: the recipe's)"
    )
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the recipe's)")
    parser.add_argument(
        "--parent",
        type=Path,
        metavar="BUNDLE",
        help="the bundle this one succeeds (fine-tuned from): recorded in the card",
    )
    parser.add_argument(
        "--version",
        help="the new bundle's version (default: the recipe's); must differ from the parent's",
    )
    args = parser.parse_args(argv)
    require_training_extra("tf2onnx", "onnx")
    _logging()
    from dicomnode.converters.export import export_checkpoint
    from dicomnode.models.lineage import check_lineage, record_lineage

    parent = check_lineage(args.checkpoint, args.parent, args.version)
    bundle = export_checkpoint(
        args.checkpoint, args.out, tolerance=args.tolerance, opset=args.opset
    )
    if parent is not None or args.version:
        bundle = record_lineage(bundle, args.checkpoint, parent, args.version)
    parity = bundle.card.parity
    print(
        json.dumps(
            {
                "bundle": str(bundle.path),
                "sha256": bundle.card.sha256,
                "opset": bundle.card.opset,
                "max_abs_diff": parity["max_abs_diff"],
            },
            indent=1,
        )
    )
    return 0


def synthetic_main(argv: Sequence[str] | None = None) -> int:
    """``dicomnode synth``: write synthetic CT series with SEG labels (no TensorFlow)."""
    parser = argparse.ArgumentParser(
        prog="dicomnode synth",
        description="Write synthetic CT series with DICOM SEG lesion labels for training.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cases", type=int, default=48, help="number of cases (default 48)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--negative-fraction",
        type=float,
        default=None,
        help="fraction of cases without lesions (default: the preset's, 0.2 for default)",
    )
    parser.add_argument(
        "--preset",
        choices=("default", "small-lesions", "fine-grid"),
        default="default",
        help="ranges the cases are drawn from: default (0.8-1.8 mm pixels, lesions of "
        "2.5-15 mm), small-lesions (0.6 mm pixels, 1.25 mm slices, lesions of 3-5 mm), "
        "fine-grid (0.5-0.9 mm pixels, lesions of 2.5-8 mm)",
    )
    args = parser.parse_args(argv)
    from dataclasses import replace

    from dicomnode.models.synthetic import PRESETS, write_dataset

    _logging()
    config = PRESETS[args.preset]
    if args.negative_fraction is not None:
        config = replace(config, negative_fraction=args.negative_fraction)
    write_dataset(args.out, args.cases, args.seed, config)
    return 0
