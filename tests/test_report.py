"""Report building blocks: images survive the round trip through a PNG data URI, tables escape their cells."""

import base64
import io

import torch
from PIL import Image

from diffmem.report import html_page, html_table, image_grid, markdown_table, png_data_uri


def test_png_data_uri_round_trips_pixels():
    image = torch.zeros(3, 4, 4)
    image[0, 0, 0] = 1.0  # one red pixel
    image[2, 3, 3] = 0.5
    uri = png_data_uri(image)
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.size == (4, 4)
    assert decoded.getpixel((0, 0)) == (255, 0, 0)
    assert decoded.getpixel((3, 3)) == (0, 0, 128)
    assert Image.open(io.BytesIO(base64.b64decode(png_data_uri(image, scale=3).split(",", 1)[1]))).size == (12, 12)


def test_image_grid_places_images_row_by_row():
    images = torch.stack([torch.full((3, 2, 2), value) for value in (0.0, 0.25, 0.5)])
    grid = image_grid(images, columns=2, padding=1)
    assert grid.shape == (3, 1 + 2 * 3, 1 + 2 * 3)
    assert float(grid[0, 1, 4]) == 0.25  # second image, first row
    assert float(grid[0, 4, 1]) == 0.5  # third image, second row
    assert float(grid[0, 4, 4]) == 1.0  # empty slot stays white


def test_tables_escape_text_and_keep_html():
    table = html_table(["a", "b"], [["<b>x</b>", "1 < 2"], [0.123456, 3]])
    assert "<b>x</b>" in table and "1 &lt; 2" in table and "0.1235" in table
    assert markdown_table(["k", "v"], [["a|b", 0.5]]).splitlines()[2] == "| a\\|b | 0.5 |"
    assert html_page("T & U", table).startswith("<!doctype html>") and "T &amp; U" in html_page("T & U", "")
