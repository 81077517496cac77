"""The package's shape: runtime/, device/ and artifact/ run without torch (what a device or a CI runner has), and a
wheel carries the device profiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_FREE = ("runtime", "device", "artifact")


def _modules(subpackage: str) -> list[str]:
    return sorted(f"exporter.{subpackage}.{p.stem}" for p in (REPO / "exporter" / subpackage).glob("*.py")
                  if p.stem != "__init__")


@pytest.mark.parametrize("subpackage", TORCH_FREE)
def test_subpackage_imports_no_torch(subpackage):
    """Each module imported alone, in a fresh interpreter: torch (and transformers) stay out of sys.modules."""
    code = ("import importlib, json, sys\n"
            f"found = {{}}\n"
            f"for name in {_modules(subpackage)!r}:\n"
            "    importlib.import_module(name)\n"
            "    found[name] = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "print(json.dumps(found))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    heavy = {name: mods for name, mods in json.loads(done.stdout).items() if mods}
    assert not heavy, f"modules of exporter/{subpackage} import {heavy}"


def test_wheel_ships_the_device_profiles(tmp_path):
    """`pip wheel .` then the installed copy alone (not this checkout) lists every shipped profile."""
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    wheel = next(wheels.glob("exporter-*.whl"))
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                                str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    code = ("import exporter, json\n"
            "from exporter.device.profiles import list_profiles\n"
            "print(json.dumps([exporter.__file__, sorted(p.name for p in list_profiles())]))\n")
    env = {k: v for k, v in os.environ.items() if k != "EXPORTER_PROFILES_DIR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr
    location, names = json.loads(done.stdout)
    assert Path(location).is_relative_to(target)  # the wheel's copy, not the checkout
    shipped = sorted(p.stem for p in (REPO / "device_profiles").glob("*.toml"))
    assert len(names) == len(shipped) >= 5


def test_architecture_table_names_each_tested_family():
    """One spec per family the tests build: its transformers class and config model_type agree with the table."""
    import transformers
    from conftest import FAMILIES

    from exporter.architectures import ARCHITECTURES

    assert set(ARCHITECTURES) == set(FAMILIES)
    for model_type, spec in ARCHITECTURES.items():
        cls = getattr(transformers, spec.model_class)
        assert cls.config_class.model_type == model_type, spec
