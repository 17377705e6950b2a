"""The Python examples in docs/filter.md, docs/caption-readers.md, docs/unet-blocks.md and docs/batch.md run as written, on tiny files
with the names they use."""

import re
import shutil
from pathlib import Path

import pytest

import builders_base as bb
import builders_lora as bl

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize(("page", "written"), [("filter.md", "my_lora.filtered.safetensors"),
                                              ("caption-readers.md", "my_lora.caption-readers.safetensors"),
                                              ("unet-blocks.md", "my_lora.first-up-block.safetensors")])
def test_filter_pages_example(tmp_path, monkeypatch, capsys, page, written):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    shutil.move(bb.build_tiny_base(tmp_path, "sdxl", "single_file"), tmp_path / "sd_xl_base_1.0.safetensors")
    bl.write_kohya_lora(tmp_path / "my_lora.safetensors", bb.lora_lookups("sdxl", "kohya"), rank=4)
    (block,) = python_blocks(page)
    exec(compile(block, f"docs/{page}", "exec"), {})
    assert "channels" in capsys.readouterr().out
    assert (tmp_path / written).is_file()


def test_batch_page_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    shutil.move(bb.build_tiny_base(tmp_path, "sd1", "single_file"), tmp_path / "base.safetensors")
    (tmp_path / "uploads").mkdir()
    for seed in range(2):
        bl.write_kohya_lora(tmp_path / "uploads" / f"lora{seed}.safetensors", bb.lora_lookups("sd1", "kohya"),
                            rank=4, seed=seed)
    many, anchors = python_blocks("batch.md")
    exec(compile(many, "docs/batch.md", "exec"), {})
    assert capsys.readouterr().out.strip().endswith("0 failed")
    assert len(list((tmp_path / "filtered").glob("*.filtered.safetensors"))) == 2
    exec(compile(anchors, "docs/batch.md", "exec"), {})
    assert re.search(r"base weights: \d+ anchors computed, \d+ already cached", capsys.readouterr().out)

