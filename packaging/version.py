"""The app's name and version, read from pyproject.toml, and the Windows version resource built from them."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "ExpertSwap"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def write_windows_version_file(path: Path) -> str:
    """A VSVersionInfo file (what Explorer shows under Properties > Details); returns its path."""
    numbers = tuple(int(n) for n in (VERSION.split(".") + ["0"] * 4)[:4])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""VSVersionInfo(
  ffi=FixedFileInfo(filevers={numbers}, prodvers={numbers}, mask=0x3f, flags=0x0, OS=0x40004, fileType=0x1,
                    subtype=0x0, date=(0, 0)),
  kids=[
    StringFileInfo([StringTable('040904B0', [
      StringStruct('CompanyName', 'ExpertSwap developers'),
      StringStruct('FileDescription', 'ExpertSwap: chat with MoE models on small machines'),
      StringStruct('FileVersion', '{VERSION}'),
      StringStruct('InternalName', 'expertswap'),
      StringStruct('OriginalFilename', 'expertswap.exe'),
      StringStruct('ProductName', '{APP_NAME}'),
      StringStruct('ProductVersion', '{VERSION}'),
      StringStruct('LegalCopyright', 'Apache-2.0')])]),
    VarFileInfo([VarStruct('Translation', [1033, 1200])])
  ]
)
""")
    return str(path)
