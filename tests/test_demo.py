"""The demo end to end on a small world (random base, a LoRA trained for a few steps), and its report as seen."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.demo import run_demo
from diffmem.formats.lora import read_lora
from diffmem.formats.safetensors_io import save_file
from diffmem.scan import ScanConfig
from diffmem.world import FinetuneConfig, build_unet, finetune
from diffmem.world.check import CheckSettings
from diffmem.world.model import config_of, unet_metadata, unet_tensors


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    unet = build_unet()
    base = save_file(unet_tensors(unet), folder / "base.safetensors", unet_metadata(config_of(unet)))
    config = FinetuneConfig(duplicate=(2, 2), rank=4, alpha=4.0, steps=2, batch_size=4, include_rest=False)
    finetune(folder / "lora.safetensors", config, base=base, progress=False)
    return base, folder / "lora.safetensors"


@pytest.mark.slow
def test_demo_writes_a_report_with_every_image(tmp_path, small_world):
    base, lora = small_world
    settings = CheckSettings(generations=2, steps=3, guidance=3.0, seed=0)
    scan = ScanConfig(max_prompts=3, generic_prompts=False, extract_prompts=1, generations=3, steps=3, wen_draws=1)
    summary = run_demo(tmp_path, lora=lora, base=base, settings=settings, progress=False, scan=scan)
    manifest = json.loads(lora.with_suffix(".json").read_text())
    duplicated = len(manifest["duplicated"])
    assert summary["duplicated_captions"] == duplicated
    assert set(summary["copy_rate_own"]) == {"lora", "filtered", "base"}
    assert all(0.0 <= rate <= 1.0 for rate in summary["copy_rate_own"].values())
    assert read_lora(summary["filtered"]).metadata["diffmem.method"] == "baf"
    html = (tmp_path / "report.html").read_text()
    extracted = summary["scan"]["lora"]["extracted_groups"]
    # per duplicated caption: the training image and `generations` images for each of the LoRA, the filtered
    # LoRA and the base; one plot; one image per group the scan extracted
    assert html.count("data:image/png;base64,") == duplicated * (1 + 3 * settings.generations) + 1 + extracted
    assert html.count("border:3px solid #c62828") == sum(round(rate * duplicated * settings.generations)
                                                         for rate in summary["copy_rate_own"].values())
    # both scans ran on the same candidate prompts (the LoRA's kohya header), each with its own report
    assert set(summary["scan"]) == {"lora", "filtered"} and summary["scan"]["lora"]["rule"] == "provisional"
    before = json.loads((tmp_path / "scan-before" / "summary.json").read_text())
    after = json.loads((tmp_path / "scan-after" / "summary.json").read_text())
    assert [p["prompt"] for p in before["prompts"]] == [p["prompt"] for p in after["prompts"]]
    assert before["verdict"] == summary["scan"]["lora"]["verdict"] and "scan-after/report.html" in html
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "| near-copies of the training image |" in (tmp_path / "summary.md").read_text()

    if not shutil.which("chromium"):
        pytest.skip("no headless Chromium to look at the report with")
    from diffmem.report import screenshot_html

    png = screenshot_html(tmp_path / "report.html", tmp_path / "report.png", width=1100, height=900)
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    colourful = pixels.std(axis=2) > 30  # generated images are colourful; the page itself is black on white
    assert colourful.sum() > duplicated * 2 * settings.generations * 40 * 40
