"""Train a model from a recipe: data -> tf.data -> Keras fit -> checkpoints -> evaluation.

Deterministic for a given recipe seed and data folder: ``keras.utils.set_random_seed``,
``tf.config.experimental.enable_op_determinism``, a seeded case split and patch sampler,
and stateless augmentation.  Writes the run folder described in
:mod:`dicomnode.models.run`: best and last checkpoints, TensorBoard logs, early stopping
on validation loss, ``training.json`` (history, wall time) and the held-out evaluation.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from dicomnode.errors import ModelError
from dicomnode.models.architectures import build_model
from dicomnode.models.data import (
    Case,
    PatchSampler,
    fill_value,
    load_cases,
    prepare_case,
    split_cases,
    training_dataset,
    validation_arrays,
)
from dicomnode.models.evaluate import EvalSpec, KerasPredictor, evaluate
from dicomnode.models.recipe import Recipe
from dicomnode.models.run import RunFiles

log = logging.getLogger(__name__)

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _serializable(fn: _Fn) -> _Fn:
    """``keras.saving.register_keras_serializable(package="dicomnode")``, typed.

    Keras has no type information, so its decorator would make ``fn`` untyped; the
    registration (``dicomnode>NAME``) and the returned object are Keras' own.
    """
    registered: _Fn = keras.saving.register_keras_serializable(package="dicomnode")(fn)
    return registered


@_serializable
def dice_bce_loss(y_true: Any, y_pred: Any) -> Any:
    """Binary cross-entropy plus (1 - soft Dice over the batch)."""
    bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred))
    inter = ops.sum(y_true * y_pred)
    soft_dice = (2.0 * inter + 1.0) / (ops.sum(y_true) + ops.sum(y_pred) + 1.0)
    return bce + 1.0 - soft_dice


@_serializable
def hard_dice(y_true: Any, y_pred: Any) -> Any:
    """Dice of the 0.5-thresholded prediction over the batch (a training metric)."""
    p = ops.cast(y_pred >= 0.5, "float32")
    return (2.0 * ops.sum(y_true * p) + 1.0) / (ops.sum(y_true) + ops.sum(p) + 1.0)


def set_determinism(seed: int) -> None:
    """Seed Python, numpy and TensorFlow and make TF ops deterministic."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def eval_spec(recipe: Recipe) -> EvalSpec:
    return EvalSpec(
        task=recipe.task,
        preprocessing=recipe.preprocessing,
        context_slices=recipe.context_slices,
        labels=recipe.labels,
        min_component_volume_mm3=recipe.bundle.min_component_volume_mm3,
        min_area_mm2=recipe.data.min_positive_area_mm2,
    )


def _compile(model: keras.Model, recipe: Recipe) -> None:
    t = recipe.training
    if recipe.task == "segmentation":
        from dicomnode.models.losses import lesion_weighted_bce

        losses = {"dice_bce": dice_bce_loss, "lesion_weighted_bce": lesion_weighted_bce}
        loss: Any = losses.get(t.loss, "binary_crossentropy")
        metrics: list[Any] = [hard_dice]
    else:
        loss = "binary_crossentropy"
        metrics = [keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")]
    model.compile(optimizer=keras.optimizers.Adam(t.learning_rate), loss=loss, metrics=metrics)


class _EpochSummaries(keras.callbacks.Callback):  # type: ignore[misc]  # Callback is Any (no stubs)
    """TensorBoard scalars per epoch (``train/`` and ``validation/`` runs).

    Written with TensorFlow's core ``tf.summary.write`` and the scalars plugin metadata,
    so the logs need no ``tensorboard`` package to be written (only to be viewed).
    """

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        from tensorflow.core.framework import summary_pb2

        self.writers = {
            "train": tf.summary.create_file_writer(str(log_dir / "train")),
            "validation": tf.summary.create_file_writer(str(log_dir / "validation")),
        }
        meta = summary_pb2.SummaryMetadata()
        meta.plugin_data.plugin_name = "scalars"
        self.metadata = meta.SerializeToString()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for key, value in (logs or {}).items():
            run = "validation" if key.startswith("val_") else "train"
            tag = "epoch_" + key.removeprefix("val_")
            with self.writers[run].as_default():
                tf.summary.write(tag, tf.constant(float(value)), step=epoch, metadata=self.metadata)
        for writer in self.writers.values():
            writer.flush()


class _Progress(keras.callbacks.Callback):  # type: ignore[misc]  # Callback is Any (no stubs)
    """One log line per epoch with the elapsed wall time."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        shown = ", ".join(
            f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()) if isinstance(v, float | int)
        )
        log.info(
            "epoch %d/%d (%.0f s): %s", epoch + 1, self.total, time.monotonic() - self.start, shown
        )


def describe_data(
    data_dir: Path | Sequence[Path], cases: Sequence[Case], train: list[int], val: list[int]
) -> str:
    slices = sum(c.hu.shape[0] for c in cases)
    lesions = sum(int(c.mask.any()) for c in cases)
    spacings = [c.pixel_spacing[0] for c in cases]
    folders = [data_dir] if isinstance(data_dir, Path) else list(data_dir)
    return (
        f"{len(cases)} CT series with DICOM SEG labels from "
        f"{' + '.join(f'{d.name}/' for d in folders)} "
        f"({slices} slices, {lesions} series with lesions, pixel spacing "
        f"{min(spacings):.2f}-{max(spacings):.2f} mm); case split {len(train)} train / "
        f"{len(val)} validation"
    )


def initial_model(init_from: Path, recipe: Recipe) -> Any:
    """The model of an earlier run (its folder or a ``.keras`` file) to fine-tune: it must
    take the recipe's context slices and give one output per label."""
    path = RunFiles.locate(init_from).checkpoint_path(init_from)
    model = keras.saving.load_model(path, compile=False)
    channels, classes = int(model.inputs[0].shape[-1]), int(model.outputs[0].shape[-1])
    if (channels, classes) != (recipe.context_slices, len(recipe.labels)):
        raise ModelError(
            f"{init_from}: its model takes {channels} slice(s) and gives {classes} output(s); "
            f"the recipe needs {recipe.context_slices} and {len(recipe.labels)}"
        )
    return model


def train(
    recipe: Recipe,
    data_dir: Path | Sequence[Path],
    out: Path,
    *,
    test_dir: Path | None = None,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    max_cases: int | None = None,
    init_from: Path | None = None,
) -> dict[str, Any]:
    """Train per ``recipe`` on ``data_dir`` (one folder or several: base data plus the
    corrections that came back); write the run folder ``out``; return training.json.

    ``init_from`` (an earlier run) fine-tunes its model instead of starting from random
    weights.  ``epochs``, ``steps_per_epoch`` and ``max_cases`` override the recipe (for
    smoke runs).
    """
    started = time.monotonic()
    t = recipe.training
    set_determinism(t.seed)
    run = RunFiles(out)
    out.mkdir(parents=True, exist_ok=True)
    run.recipe.write_text(recipe.source)
    run.last.parent.mkdir(parents=True, exist_ok=True)

    folders = [data_dir] if isinstance(data_dir, Path) else list(data_dir)
    cases = [c for folder in folders for c in load_cases(folder, recipe.labels)][:max_cases]
    train_idx, val_idx = split_cases(len(cases), recipe.data.validation_fraction, t.seed)
    spec = recipe.preprocessing
    prepared = [prepare_case(c, spec, soft=recipe.data.soft_labels) for c in cases]
    fill = fill_value(spec)
    sampler = PatchSampler(
        [prepared[i] for i in train_idx],
        task=recipe.task,
        patch_size=recipe.data.patch_size,
        context=recipe.context_slices,
        positive_fraction=recipe.data.positive_fraction,
        min_area_mm2=recipe.data.min_positive_area_mm2,
        fill=fill,
        positive_sampling=recipe.data.positive_sampling,
    )
    train_ds = training_dataset(sampler, recipe, t.seed)
    val_x, val_y = validation_arrays(
        [prepared[i] for i in val_idx],
        task=recipe.task,
        context=recipe.context_slices,
        slices_per_case=recipe.data.validation_slices_per_case,
        min_area_mm2=recipe.data.min_positive_area_mm2,
        fill=fill,
        seed=t.seed,
    )
    np.savez_compressed(run.heldout, inputs=val_x[:8])
    description = describe_data(data_dir, cases, train_idx, val_idx)
    log.info("%s; %d validation slices", description, len(val_x))

    if init_from is not None:
        model = initial_model(init_from, recipe)
    else:
        model = build_model(
            recipe.architecture,
            channels=recipe.context_slices,
            classes=len(recipe.labels),
            **recipe.model_params,
        )
    _compile(model, recipe)
    n_epochs = epochs or t.epochs
    callbacks = [
        keras.callbacks.ModelCheckpoint(run.best, monitor="val_loss", save_best_only=True),
        keras.callbacks.ModelCheckpoint(run.last),
        keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=t.early_stopping_patience,
            min_delta=t.min_delta,
            restore_best_weights=True,
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=max(1, t.early_stopping_patience // 2)
        ),
        _EpochSummaries(run.tensorboard),
        _Progress(n_epochs),
    ]
    history = model.fit(
        train_ds,
        epochs=n_epochs,
        steps_per_epoch=steps_per_epoch or t.steps_per_epoch,
        validation_data=(val_x, val_y),
        validation_batch_size=recipe.data.batch_size,
        callbacks=callbacks,
        shuffle=False,
        verbose=1 if sys.stderr.isatty() else 0,
    )
    train_time = time.monotonic() - started
    val_losses = history.history["val_loss"]
    best_epoch = int(np.argmin(val_losses)) + 1
    # EarlyStopping restored the best weights only when it stopped early; load the best.
    model = keras.saving.load_model(run.best, compile=False)

    if test_dir is not None:
        eval_cases = load_cases(test_dir, recipe.labels)
        eval_source = f"held-out test folder {test_dir.name}/ ({len(eval_cases)} series)"
    else:
        eval_cases = [cases[i] for i in val_idx]
        eval_source = f"validation cases ({len(eval_cases)} series)"
    result = evaluate(KerasPredictor(model), eval_cases, eval_spec(recipe), run.evaluation)
    info = {
        "recipe": recipe.bundle.name,
        "seed": t.seed,
        "data_dir": str(data_dir) if isinstance(data_dir, Path) else [str(d) for d in folders],
        "init_from": None if init_from is None else str(init_from),
        "data_description": description + f"; metrics on {eval_source}",
        "epochs_run": len(val_losses),
        "best_epoch": best_epoch,
        "best_val_loss": float(min(val_losses)),
        "wall_time_s": round(train_time, 1),
        "total_time_s": round(time.monotonic() - started, 1),
        "parameters": int(model.count_params()),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "headline": result["summary"]["headline"],
    }
    run.training.write_text(json.dumps(info, indent=1) + "\n")
    log.info(
        "training done in %.0f s (best epoch %d); %s",
        train_time,
        best_epoch,
        json.dumps(info["headline"]),
    )
    return info
