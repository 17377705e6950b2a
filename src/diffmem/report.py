"""Self-contained HTML and markdown reports: image grids embedded as PNG data URIs, tables, and a page shell.

Shared by the demo, the audit and the benchmark, so every report a person opens looks and behaves the same.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffmem.errors import DiffmemError

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: middle; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.pix { image-rendering: pixelated; border: 1px solid #999; }
.bad { color: #b00020; font-weight: 600; } .good { color: #1b5e20; font-weight: 600; }
.note { color: #555; font-size: 0.9em; }
"""


def to_pil(image: torch.Tensor) -> Image.Image:
    """A [3, H, W] tensor in [0, 1] as an RGB image."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def png_data_uri(image: torch.Tensor, scale: int = 1) -> str:
    """A [3, H, W] image as a ``data:image/png;base64,...`` URI, optionally upscaled (nearest) by ``scale``."""
    picture = to_pil(image)
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def img_tag(image: torch.Tensor, size: int = 96, title: str = "") -> str:
    """An inline ``<img>`` of a [3, H, W] image shown ``size`` pixels wide (pixelated, not blurred)."""
    return (
        f'<img class="pix" src="{png_data_uri(image)}" width="{size}" height="{size}" '
        f'alt="{html.escape(title)}" title="{html.escape(title)}">'
    )


def image_grid(images: torch.Tensor, columns: int, padding: int = 2) -> torch.Tensor:
    """Tile [N, 3, H, W] images into one [3, H', W'] image, row by row, on a white background."""
    count, channels, height, width = images.shape
    rows = max(1, -(-count // columns))
    grid = torch.ones(channels, rows * (height + padding) + padding, columns * (width + padding) + padding)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[:, top : top + height, left : left + width] = images[index]
    return grid


def save_png(image: torch.Tensor, path: str | Path, scale: int = 1, description: str | None = None) -> Path:
    """Write a [3, H, W] image as a PNG file; `description` goes into its standard "Description" text chunk (what
    the picture shows, read back by `png_description`)."""
    from PIL.PngImagePlugin import PngInfo

    picture = to_pil(image)
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = None
    if description is not None:
        info = PngInfo()
        info.add_itxt("Description", description)
    picture.save(path, pnginfo=info)
    return path


def png_description(path: str | Path) -> str | None:
    """The "Description" text chunk of a PNG written by `save_png`; None when the file or the chunk is absent or
    the file is not a readable PNG."""
    try:
        with Image.open(path) as picture:
            return picture.text.get("Description") if hasattr(picture, "text") else None
    except (FileNotFoundError, OSError):
        return None


def load_image(path: str | Path) -> torch.Tensor:
    """An image file (PNG, JPEG, ...; any mode, converted to RGB) as a [3, H, W] float tensor in [0, 1], the inverse
    of `save_png`; a missing file is a `DiffmemError`, an unreadable one a `FileFormatError`, each naming the file."""
    from PIL import UnidentifiedImageError

    from diffmem.errors import FileFormatError

    path = Path(path)
    if not path.is_file():
        raise DiffmemError("no such image file", path)
    try:
        with Image.open(path) as picture:
            array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as error:
        raise FileFormatError(f"is not a readable image ({error})", path) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; cells that are already HTML (start with '<') are kept, others escaped; numbers right-aligned."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f'<td class="num">{value:.4g}</td>'
        if isinstance(value, int):
            return f'<td class="num">{value}</td>'
        text = str(value)
        return f"<td>{text if text.startswith('<') else html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def between_markers(text: str | None, start: str, end: str | None = None) -> str | None:
    """The text strictly between the ``start`` line and the ``end`` line (the end of ``text`` when ``end`` is
    None), or None when ``text`` lacks them: how a regenerated page finds the part people wrote by hand."""
    if not text or start not in text:
        return None
    rest = text.split(start, 1)[1]
    if end is None:
        return rest
    return rest.split(end, 1)[0] if end in rest else None


def replace_between_markers(text: str, start: str, end: str, block: str) -> str:
    """``text`` with what lies between its one ``start`` line and its one ``end`` line replaced by ``block``; a
    clear error when the markers are missing, repeated or out of order."""
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise DiffmemError(f"needs exactly one {start!r} line followed by one {end!r} line")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block}{end}{rest.split(end, 1)[1]}"


def figure_tag(figure, title: str = "") -> str:
    """A matplotlib `Figure` (made with `matplotlib.figure.Figure`, not pyplot: no global state, no GUI backend) as
    an inline ``<img>`` (PNG data URI)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="{uri}" alt="{html.escape(title)}" title="{html.escape(title)}">'


def short_path(path: str | Path) -> str:
    """``path`` relative to the working folder when it lies inside it (a report's header stays readable), else as
    given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def html_page(title: str, body: str) -> str:
    """A complete, self-contained HTML document."""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def screenshot_html(html_path: str | Path, png_path: str | Path, width: int = 1600, height: int = 1600,
                    timeout: float = 120.0) -> Path:
    """Render an HTML file to a PNG with headless Chromium (how a person would see the report)."""
    import shutil
    import subprocess

    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        raise DiffmemError("no headless browser found: install Chromium (`apt-get install chromium`) to render "
                           "reports to PNG")
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--hide-scrollbars", f"--window-size={width},{height}",
        f"--screenshot={png_path}", html_path.as_uri(),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if completed.returncode != 0 or not png_path.is_file():
        raise DiffmemError(f"Chromium could not render the report: {completed.stderr.strip()[-500:]}", html_path)
    return png_path
