"""Run the external DICOM validators on a written object: dciodvfy and dsrdump.

dciodvfy (Debian package ``dicom3tools``) checks an instance against its IOD; it writes
``Error - ...`` and ``Warning - ...`` lines on stderr and exits non-zero on errors.
dsrdump (``dcmtk``) parses an SR document tree; it reports ``E:``/``F:`` (error, fatal) and
``W:`` lines on stderr and exits non-zero when it cannot read the document.

Used by the tests and available to the CLI.  A missing tool raises :class:`OutputError`
naming the package to install; :func:`find_tool` tells beforehand.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.errors import OutputError

TIMEOUT_S = 120.0
_PACKAGES = {"dciodvfy": "dicom3tools", "dsrdump": "dcmtk"}


@dataclass(frozen=True)
class ValidationReport:
    """What a validator said about one file."""

    tool: str
    path: Path
    returncode: int
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        """True when the validator reported no error."""
        return not self.errors


def find_tool(name: str) -> str | None:
    """Full path of the executable ``name`` on PATH, or None."""
    return shutil.which(name)


def _run(tool: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    executable = find_tool(tool)
    if executable is None:
        raise OutputError(f"{tool} is not installed: apt-get install {_PACKAGES.get(tool, tool)}")
    try:
        return subprocess.run(
            [executable, *args],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise OutputError(f"{tool} did not finish within {TIMEOUT_S:.0f} s") from exc


def _check_path(path: Path | str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise OutputError(f"path {path} is not a file")
    return path


def run_dciodvfy(path: Path | str) -> ValidationReport:
    """Validate ``path`` against its IOD with dciodvfy (dicom3tools)."""
    path = _check_path(path)
    proc = _run("dciodvfy", [str(path)])
    lines = (proc.stderr + proc.stdout).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    if proc.returncode != 0 and not errors:
        errors.append(f"dciodvfy exited with status {proc.returncode}")
    return ValidationReport(
        "dciodvfy", path, proc.returncode, errors, warnings, proc.stderr + proc.stdout
    )


def run_dsrdump(path: Path | str) -> ValidationReport:
    """Parse the SR document ``path`` with dsrdump (dcmtk); the tree is in ``output``."""
    path = _check_path(path)
    proc = _run("dsrdump", [str(path)])
    diagnostics = proc.stderr.splitlines()
    errors = [
        line
        for line in diagnostics
        if line.startswith(("E:", "F:"))
        or ("error" in line.lower() and not line.startswith(("W:", "I:", "D:")))
    ]
    warnings = [line for line in diagnostics if line.startswith("W:")]
    if proc.returncode != 0 and not errors:
        errors.append(f"dsrdump exited with status {proc.returncode}")
    return ValidationReport("dsrdump", path, proc.returncode, errors, warnings, proc.stdout)
