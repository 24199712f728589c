"""Template-browser thumbnails for the example workflows: an honest schematic, not a result.

ComfyUI's template browser shows `<workflow name>.jpg` beside each workflow file. Each
thumbnail draws the workflow's stages to scale (every image size as a rectangle, nested from
the base to the final size, labelled in pixels), with the workflow's title and its model
family. scripts/make_workflows.py calls `save` for every workflow it writes.

    python scripts/thumbnails.py OUT.jpg "Title" SD1.5 1024x512 2048x1024 ...   (one by hand)
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (512, 384)
BACKGROUND = "#1d2330"
COLOURS = ["#6ea8fe", "#8fd19e", "#ffd166", "#f4978e", "#c3a6ff"]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def draw(title: str, family: str, stages: list[tuple[int, int]], note: str = "") -> Image.Image:
    """A thumbnail: `stages` are (width, height) in pixels from the base image to the final
    one, drawn as nested rectangles anchored bottom-left and scaled so the largest fits."""
    img = Image.new("RGB", SIZE, BACKGROUND)
    d = ImageDraw.Draw(img)
    d.text((16, 12), title, fill="white", font=_font(24))
    d.text((16, 44), f"{family} + LinFusion" + (f" - {note}" if note else ""), fill="#aab4c8", font=_font(16))
    box_x0, box_y1, box_w, box_h = 20, SIZE[1] - 20, 330, SIZE[1] - 100
    big_w, big_h = max(w for w, _ in stages), max(h for _, h in stages)
    scale = min(box_w / big_w, box_h / big_h)
    small = _font(15)
    for i, (w, h) in enumerate(stages):
        rw, rh = max(3, round(w * scale)), max(3, round(h * scale))
        colour = COLOURS[i % len(COLOURS)]
        rect = (box_x0, box_y1 - rh, box_x0 + rw, box_y1)
        if i == 0:
            d.rectangle(rect, fill=colour)
        else:
            d.rectangle(rect, outline=colour, width=3)
        # the legend: one line per size, in the rectangle's colour
        label = f"{w} x {h}" + (" (base)" if i == 0 and len(stages) > 1 else "")
        d.text((box_x0 + box_w + 16, 96 + 26 * i), label, fill=colour, font=small)
    return img


def save(path: Path, title: str, family: str, stages: list[tuple[int, int]], note: str = "") -> Path:
    draw(title, family, stages, note).save(path, "JPEG", quality=85, optimize=True)
    return path


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    out, title, family, *sizes = sys.argv[1:]
    save(Path(out), title, family, [tuple(int(v) for v in s.lower().split("x")) for s in sizes])
