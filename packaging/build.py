"""``make package``: build the onedir app for this OS into dist/, report its size, run its --self-test.

On Linux the onedir also becomes ``dist/expertswap-VERSION-linux-ARCH.tar.gz`` with a .desktop file,
the icon and ``install.sh`` (adds the app to the desktop menu). The self-test runs the built binary
offscreen with an empty model cache, so it proves the bundled GGUF and shipped files build the
default model with no network and no Python on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from version import APP_NAME, VERSION

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
INSTALL_SH = """#!/bin/sh
# Adds ExpertSwap to your desktop menu (no root needed); run it from the unpacked folder.
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$HOME/.local/share/applications" "$HOME/.local/share/icons/hicolor/256x256/apps"
cp "$here/expertswap.png" "$HOME/.local/share/icons/hicolor/256x256/apps/expertswap.png"
apps="$HOME/.local/share/applications"
sed "s|^Exec=expertswap|Exec=\\"$here/expertswap\\"|" "$here/expertswap.desktop" > "$apps/expertswap.desktop"
echo "ExpertSwap added to the menu; run it with: $here/expertswap"
"""


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build() -> Path:
    """Run PyInstaller on the spec; returns the app folder (or the .app bundle on macOS)."""
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN",
                    "--distpath", str(DIST), "--workpath", str(ROOT / "build" / "pyinstaller"),
                    str(ROOT / "packaging" / "expertswap.spec")], check=True)
    return DIST / (f"{APP_NAME}.app" if sys.platform == "darwin" else APP_NAME.lower())


def executable(app: Path) -> Path:
    if sys.platform == "darwin":
        return app / "Contents" / "MacOS" / APP_NAME.lower()
    return app / ("expertswap.exe" if sys.platform == "win32" else "expertswap")


def linux_tarball(app: Path) -> Path:
    """Desktop integration files next to the binary, then the whole folder as a tar.gz."""
    shutil.copy(ROOT / "packaging" / "expertswap.desktop", app / "expertswap.desktop")
    shutil.copy(ROOT / "src" / "expertswap" / "app" / "icons" / "expertswap.png", app / "expertswap.png")
    script = app / "install.sh"
    script.write_text(INSTALL_SH)
    script.chmod(0o755)
    out = DIST / f"expertswap-{VERSION}-linux-{platform.machine()}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(app, arcname=f"expertswap-{VERSION}")
    return out


def self_test(app: Path) -> None:
    """The built binary, offscreen, with a fresh model cache; raises if it does not exit 0."""
    with tempfile.TemporaryDirectory(prefix="expertswap-cache-") as cache:
        env = dict(os.environ, QT_QPA_PLATFORM="offscreen", EXPERTSWAP_CACHE=cache)
        env.pop("EXPERTSWAP_SMOLLM2_GGUF", None)
        start = time.perf_counter()
        subprocess.run([str(executable(app)), "--self-test"], env=env, check=True, timeout=900)
        print(f"self-test passed in {time.perf_counter() - start:.0f} s (first launch: built the default model)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-self-test", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    app = build()
    print(f"built {app} in {time.perf_counter() - start:.0f} s: {size_of(app) / 2**20:.0f} MiB")
    if sys.platform.startswith("linux"):
        tarball = linux_tarball(app)
        print(f"packed {tarball}: {size_of(tarball) / 2**20:.0f} MiB")
    if not args.skip_self_test:
        self_test(app)


if __name__ == "__main__":
    main()
