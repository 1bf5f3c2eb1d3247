"""Draw the app icon (a committee: a grid of experts, a few lit) and write PNG, ICO and ICNS.

Run once after changing the design: python packaging/make_icons.py (needs Pillow).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "src" / "expertswap" / "app" / "icons"
LIT = {(0, 1), (1, 3), (2, 0), (2, 2), (3, 1)}  # resident experts, one per row or two: the committee


def draw(size: int = 1024) -> Image.Image:
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    pen = ImageDraw.Draw(image)
    pad = size // 16
    pen.rounded_rectangle((pad, pad, size - pad, size - pad), radius=size // 6, fill=(32, 48, 84, 255))
    cells, gap = 4, size // 28
    inner = size - 2 * pad - 2 * size // 10
    cell = (inner - (cells - 1) * gap) // cells
    origin = pad + size // 10
    for row in range(cells):
        for col in range(cells):
            x, y = origin + col * (cell + gap), origin + row * (cell + gap)
            colour = (255, 166, 43, 255) if (row, col) in LIT else (84, 104, 148, 255)
            pen.rounded_rectangle((x, y, x + cell, y + cell), radius=cell // 5, fill=colour)
    return image


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    image = draw()
    image.resize((256, 256), Image.LANCZOS).save(OUT / "expertswap.png")
    image.save(OUT / "expertswap.ico", sizes=[(s, s) for s in (16, 24, 32, 48, 64, 128, 256)])
    image.save(OUT / "expertswap.icns")


if __name__ == "__main__":
    main()
