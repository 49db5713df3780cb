"""Copies of this Flower app to change and submit with ``flwr run <copy>``: as it is (a test
changes its configuration or adds a model), or with one member that corrupts its replies
(:mod:`deploy.faulty_app`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from deploy.flwr_cli import PROJECT

__all__ = ["APP_PACKAGES", "FAULTY_APP", "copy_app", "faulty_app_copy"]

APP_PACKAGES = ("wash_fed", "server", "client")
"""What ``flwr run`` needs of this project: the packages its ServerApp and ClientApp import."""
FAULTY_APP = Path(__file__).resolve().parent / "faulty_app.py"
"""A ClientApp in which one member corrupts its replies (its docstring lists the faults)."""


def copy_app(target: Path) -> Path:
    """A copy of this app (its packages and pyproject.toml) in ``target``."""
    ignore = shutil.ignore_patterns("__pycache__")
    for package in APP_PACKAGES:
        shutil.copytree(PROJECT / package, target / package, ignore=ignore)
    shutil.copy(PROJECT / "pyproject.toml", target / "pyproject.toml")
    return target


def faulty_app_copy(target: Path, fault: str, member: int) -> Path:
    """A copy of this app in ``target`` whose member ``member`` commits ``fault``
    (:data:`FAULTY_APP`); every other member is honest."""
    app = copy_app(target)
    (app / "faulty").mkdir()
    (app / "faulty" / "__init__.py").write_text("")
    shutil.copy(FAULTY_APP, app / "faulty" / "app.py")
    (app / "faulty" / "fault.py").write_text(f"FAULT = {fault!r}\nMEMBER = {member}\n")
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(
            'clientapp = "client.app:app"', 'clientapp = "faulty.app:app"'
        )
    )
    return app
