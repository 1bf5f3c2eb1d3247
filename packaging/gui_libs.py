"""Before the window opens on Linux: are the system libraries of Qt's xcb plugin there?

PySide6 >= 6.5 needs libxcb-cursor0 and friends, which a fresh desktop install may lack; without
them the app dies before its window with a message about "xcb" that few users can act on. This
asks ``ldd`` which of the plugin's libraries are missing and names the one apt command (or runs
it, as root with apt-get, the way .ci/run installs what offscreen tests need).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# soname -> Debian/Ubuntu package
PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0", "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1", "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0", "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-shape.so.0": "libxcb-shape0", "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1", "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0", "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-xinput.so.0": "libxcb-xinput0", "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-render.so.0": "libxcb-render0", "libxcb-randr.so": "libxcb-randr0",
    "libX11-xcb.so.1": "libx11-xcb1", "libxcb.so.1": "libxcb1", "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1", "libfontconfig.so.1": "libfontconfig1", "libdbus-1.so.3": "libdbus-1-3",
    "libglib-2.0.so.0": "libglib2.0-0",
}


def missing_sonames(ldd_output: str) -> list[str]:
    """The libraries ``ldd`` reports as "not found"."""
    return sorted({line.split("=>")[0].strip() for line in ldd_output.splitlines() if "not found" in line})


def packages_for(sonames: list[str]) -> list[str]:
    return sorted({PACKAGES.get(name, name) for name in sonames})


def xcb_plugin_libraries() -> list[Path]:
    import PySide6

    qt = Path(PySide6.__file__).parent / "Qt"
    return [qt / "plugins" / "platforms" / "libqxcb.so", qt / "lib" / "libQt6XcbQpa.so.6"]


def check() -> list[str]:
    """Packages to install for the xcb plugin; empty when nothing is missing or nothing can be checked."""
    if not sys.platform.startswith("linux") or shutil.which("ldd") is None:
        return []
    missing: list[str] = []
    for library in xcb_plugin_libraries():
        if library.exists():
            result = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=False)
            missing += missing_sonames(result.stdout)
    return packages_for(missing)


def main() -> int:
    if os.environ.get("QT_QPA_PLATFORM", "xcb") != "xcb":
        return 0  # offscreen, wayland, vnc: the xcb plugin is not used
    packages = check()
    if not packages:
        return 0
    command = ["apt-get", "install", "-y", *packages]
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing what the window needs: {' '.join(packages)}", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        quiet = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(command, check=False, env=quiet).returncode == 0:
            return 0
    print(f"ExpertSwap's window needs system libraries that are missing: {' '.join(packages)}\n"
          f"Install them with:\n  sudo {' '.join(command)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
