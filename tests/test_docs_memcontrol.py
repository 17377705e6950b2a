"""Every generated table in docs/memcontrol.md is what its committed `rows.json` files give: the numbers on the
page can be re-derived without training (`diffmem memcontrol collect` / `spread`)."""

from pathlib import Path

import pytest

from diffmem.memcontrol.table import (
    collect_rows,
    markdown_table,
    seed_spread,
    spread_table,
    table_markers,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
ROWS = DOCS / "memcontrol" / "rows"

#: Each marked table and the committed rows it is made from.
TABLES = {
    "faces": ["faces-seed-0.json"],
    "faces-seed-1": ["faces-seed-1.json"],
    "faces-seed-2": ["faces-seed-2.json"],
    "photos": ["photos-seed-0.json"],
    "faces-500x16": ["faces-500x16-plain.json", "faces-500x16-mitigated.json"],
}


def marked_table(name: str) -> str:
    start, end = table_markers(name)
    return (DOCS / "memcontrol.md").read_text().split(start + "\n", 1)[1].split(end, 1)[0]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_each_table_on_the_page_is_its_committed_rows(name):
    assert marked_table(name) == markdown_table(collect_rows([ROWS / f for f in TABLES[name]]))


def test_the_spread_over_seeds_is_the_three_committed_seeds():
    seeds = [ROWS / f"faces-seed-{seed}.json" for seed in range(3)]
    assert marked_table("faces-seeds") == spread_table(seed_spread(seeds))
