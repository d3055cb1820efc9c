"""The chat's starter examples: their prompts, and their pictures drawn with PIL (no
downloads, no binary files in the repo), written once into Gradio's temp directory, which it
may serve."""

import os
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw


def starter_examples() -> list[dict]:
    """A picture to describe, shapes to count, a chart to read, a code question."""
    images = draw_starter_images()
    return [
        {"text": "Describe this picture in two sentences.", "files": [images["landscape"]],
         "label": "🏞️ Describe a picture"},
        {"text": "How many shapes are there, and what colour is each?", "files": [images["shapes"]],
         "label": "🔺 Count the shapes"},
        {"text": "What does this chart show? Which month is highest?", "files": [images["chart"]],
         "label": "📊 Read a chart"},
        {"text": "Explain Python list vs tuple, with a short code example.", "files": [],
         "label": "🐍 Code question"},
    ]


def draw_starter_images() -> dict[str, str]:
    folder = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio") / "starter-images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, draw in (("landscape", _landscape), ("shapes", _shapes), ("chart", _chart)):
        path = folder / f"{name}.png"
        if not path.exists():
            image = Image.new("RGB", (384, 256), "white")
            draw(ImageDraw.Draw(image))
            tmp = path.with_suffix(".tmp.png")
            image.save(tmp)
            tmp.replace(path)  # atomic: two processes may draw at once
        paths[name] = str(path)
    return paths


def _landscape(d: ImageDraw.ImageDraw):
    for y in range(160):  # evening sky
        d.line([(0, y), (384, y)], fill=(255, 140 + y // 3, 90 + y // 2))
    d.ellipse([250, 90, 310, 150], fill=(255, 220, 120))  # the sun
    d.polygon([(0, 200), (90, 90), (180, 200)], fill=(90, 80, 120))
    d.polygon([(120, 210), (230, 110), (340, 210)], fill=(70, 60, 100))
    d.rectangle([0, 190, 384, 256], fill=(40, 110, 160))  # a lake
    d.polygon([(60, 225), (110, 225), (100, 238), (70, 238)], fill=(120, 70, 30))  # a boat
    d.line([(85, 225), (85, 195)], fill=(80, 50, 20), width=2)
    d.polygon([(86, 197), (86, 222), (104, 222)], fill=(250, 250, 245))


def _shapes(d: ImageDraw.ImageDraw):
    d.ellipse([30, 40, 120, 130], fill=(220, 40, 40))
    d.rectangle([150, 50, 240, 140], fill=(40, 90, 220))
    d.polygon([(300, 40), (350, 140), (250, 140)], fill=(40, 170, 70))
    d.ellipse([90, 160, 160, 230], fill=(250, 200, 30))
    d.rectangle([210, 170, 330, 220], fill=(150, 60, 180))


def _chart(d: ImageDraw.ImageDraw):
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun"]
    sales = [12, 18, 9, 22, 30, 17]
    d.text((120, 8), "Monthly sales (units)", fill="black")
    d.line([(40, 220), (370, 220)], fill="black")
    d.line([(40, 30), (40, 220)], fill="black")
    for i, (month, value) in enumerate(zip(months, sales)):
        x = 55 + i * 52
        d.rectangle([x, 220 - value * 6, x + 34, 220], fill=(60, 120, 200))
        d.text((x + 6, 226), month, fill="black")
        d.text((x + 8, 206 - value * 6), str(value), fill="black")
