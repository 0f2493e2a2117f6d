"""The layout of a training run folder (``dicomnode train ... --out RUN``).

::

    RUN/recipe.toml            the recipe, copied verbatim
    RUN/model.keras            best checkpoint (lowest validation loss)
    RUN/checkpoints/last.keras last epoch's checkpoint
    RUN/training.json          seed, epochs, history, wall time, data description
    RUN/heldout.npz            preprocessed held-out slices (NHWC) for the parity check
    RUN/evaluation/            metrics.json and PNG plots (``dicomnode evaluate``)
    RUN/tensorboard/           TensorBoard logs

This module does not import TensorFlow.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.errors import ConfigError


@dataclass(frozen=True)
class RunFiles:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.toml"

    @property
    def best(self) -> Path:
        return self.root / "model.keras"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.keras"

    @property
    def training(self) -> Path:
        return self.root / "training.json"

    @property
    def heldout(self) -> Path:
        return self.root / "heldout.npz"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def metrics(self) -> Path:
        return self.evaluation / "metrics.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @classmethod
    def locate(cls, checkpoint: str | Path) -> RunFiles:
        """The run a checkpoint belongs to: its folder, or the folder of a ``.keras`` file."""
        p = Path(checkpoint)
        if p.is_dir():
            root = p
        elif p.suffix == ".keras" and p.is_file():
            root = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        else:
            raise ConfigError(f"checkpoint {p} is neither a run folder nor a .keras file")
        run = cls(root)
        if not run.recipe.is_file():
            raise ConfigError(f"training run {root} has no recipe.toml")
        return run

    def checkpoint_path(self, checkpoint: str | Path) -> Path:
        p = Path(checkpoint)
        path = p if p.suffix == ".keras" else self.best
        if not path.is_file():
            raise ConfigError(f"training run {self.root} has no checkpoint {path.name}")
        return path

    def read_recipe_dict(self) -> dict[str, Any]:
        return tomllib.loads(self.recipe.read_text())
