"""Installers: the self-test the builds run, the metadata they carry, and (opt-in, slow) a real Linux build."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packaging"))

from version import VERSION, write_windows_version_file  # noqa: E402

from .test_default_model import has_gguf  # noqa: E402


@has_gguf
def test_self_test_passes_from_source(tmp_path: Path) -> None:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    run = subprocess.run([sys.executable, "-m", "expertswap.app.main", "--self-test"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "self-test passed" in run.stdout and "budget moved to" in run.stdout


def test_windows_version_resource_is_a_version_expression(tmp_path: Path) -> None:
    """PyInstaller evals this file with its VSVersionInfo classes (pefile, Windows-only, is not needed to check it)."""
    import ast

    text = Path(write_windows_version_file(tmp_path / "version.txt")).read_text()
    tree = ast.parse(text, mode="eval")
    assert isinstance(tree.body, ast.Call) and tree.body.func.id == "VSVersionInfo"
    numbers = ast.literal_eval(next(k.value for k in tree.body.keywords[0].value.keywords if k.arg == "filevers"))
    assert numbers[:3] == tuple(int(n) for n in VERSION.split("."))[:3]
    assert f"'ProductVersion', '{VERSION}'" in text and "expertswap.exe" in text


def test_desktop_entry_and_icons() -> None:
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str
    entry.read(ROOT / "packaging" / "expertswap.desktop")
    desktop = entry["Desktop Entry"]
    assert (
        desktop["Type"] == "Application"
        and desktop["Exec"].startswith("expertswap")
        and desktop["Icon"] == "expertswap"
    )
    for name in ("expertswap.png", "expertswap.ico", "expertswap.icns"):
        assert (ROOT / "src" / "expertswap" / "app" / "icons" / name).stat().st_size > 1000


@has_gguf
@pytest.mark.package
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux package is built on Linux")
def test_linux_package_builds_and_passes_its_self_test() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "packaging" / "build.py")], capture_output=True, text=True,
                         timeout=3600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "self-test passed" in run.stdout
    tarball = next((ROOT / "dist").glob(f"expertswap-{VERSION}-linux-*.tar.gz"))
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    top = f"expertswap-{VERSION}"
    for member in (
        "expertswap",
        "expertswap.desktop",
        "install.sh",
        "_internal/expertswap/models/default_model/files/plan.safetensors",
        "_internal/expertswap/app/icons/expertswap.png",
        "_internal/SmolLM2-135M-Instruct.Q4_1.gguf",
    ):
        assert f"{top}/{member}" in names


def test_gui_libs_names_the_apt_packages_of_missing_libraries(tmp_path: Path, monkeypatch, capsys) -> None:
    """A plugin whose dependency is gone (really: ldd on a library we built, then its dependency deleted)."""
    import shutil

    import gui_libs

    if shutil.which("gcc") is None or shutil.which("ldd") is None:
        pytest.skip("needs gcc and ldd")
    (tmp_path / "dep.c").write_text("int dep(void) { return 1; }\n")
    (tmp_path / "plugin.c").write_text("int dep(void);\nint plugin(void) { return dep(); }\n")
    soname = "libexpertswap-absent.so.7"  # on no system, so ldd cannot find it anywhere else
    monkeypatch.setitem(gui_libs.PACKAGES, soname, "libexpertswap-absent7")
    dep = tmp_path / soname
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(dep), f"-Wl,-soname,{soname}",
                    str(tmp_path / "dep.c")], check=True)
    plugin = tmp_path / "libqxcb.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(plugin), str(tmp_path / "plugin.c"), str(dep)], check=True)
    dep.unlink()
    monkeypatch.setattr(gui_libs, "xcb_plugin_libraries", lambda: [plugin])
    assert gui_libs.missing_sonames("\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n") == [
        "libfoo.so.1"
    ]
    assert gui_libs.check() == ["libexpertswap-absent7"]
    monkeypatch.setattr(gui_libs.os, "geteuid", lambda: 1000)  # not root: say what to run, do not run it
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    assert gui_libs.main() == 1
    assert "sudo apt-get install -y libexpertswap-absent7" in capsys.readouterr().err

