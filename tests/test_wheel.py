"""The package installs like one: the wheel built from this checkout, installed into a fresh venv outside it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from .test_default_model import has_gguf

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


def _wheel(out: Path) -> Path:
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, ROOT, cwd=out)
    return next(out.glob("expertswap-*.whl"))


def test_the_wheel_carries_the_package_data_and_nothing_of_the_repository(tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(_wheel(tmp_path)).namelist())
    for data in ("expertswap/models/default_model/files/plan.safetensors", "expertswap/app/icons/expertswap.png",
                 "expertswap/engine/weights/compat.py", "expertswap/cli/__init__.py"):
        assert data in names, data
    assert not [n for n in names if n.startswith(("tools/", "tests/", "benchmarks/", "engine/", "app/"))]


@has_gguf
def test_the_installed_cli_and_app_run_from_a_fresh_venv_outside_the_checkout(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel,
         cwd=tmp_path)
    # the dependencies (torch, transformers, Qt, the GGUF) come from this environment, placed after the venv's own
    # packages; a path added by a .pth has its own .pth files skipped, so this checkout's editable install stays out
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"QT_QPA_PLATFORM": "offscreen"}

    where = _run(python, "-c", "import expertswap.cli; print(expertswap.cli.__file__)", cwd=tmp_path, env=env)
    assert Path(where.strip()).is_relative_to(venv), where
    out = json.loads(_run(bin_dir / "expertswap-cli", "generate", "--model", "default", "--prompt", "Hello",
                          "--max-new-tokens", "4", "--json", cwd=tmp_path, env=env))
    assert len(out["token_ids"]) >= 1 and out["peak_resident_expert_bytes"] <= out["budget_bytes"]
    version = _run(bin_dir / "expertswap", "--version", cwd=tmp_path, env=env)
    assert version.split() == ["expertswap", importlib.metadata.version("expertswap")]
