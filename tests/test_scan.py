"""The scan's candidate prompts: read from the traces trainers leave in a LoRA's header."""

from __future__ import annotations

import json

from diffmem.scan import candidate_prompts
from diffmem.scan.prompts import GENERIC_PROMPTS, folder_prompt, tag_prompts


def kohya_metadata() -> dict[str, str]:
    """The dataset fields of a kohya LoRA trained on 10 captions in one folder, 8 with the trigger word."""
    tags = {"sks woman": 8, "portrait": 6, "smiling": 2, "red hair": 5, "outdoors": 1}
    return {"ss_tag_frequency": json.dumps({"10_sks woman": tags}),
            "ss_dataset_dirs": json.dumps({"10_sks woman": {"n_repeats": 10, "img_count": 10}}),
            "ss_output_name": "anna_v2"}


def test_tags_give_a_typical_caption_and_the_frequent_tags():
    prompts = tag_prompts(json.loads(kohya_metadata()["ss_tag_frequency"]), tags_per_prompt=3)
    assert prompts == ["sks woman, portrait, red hair", "sks woman", "portrait", "red hair"]


def test_candidates_are_specific_first_unique_and_end_with_the_empty_prompt():
    found = candidate_prompts(kohya_metadata(), limit=8)
    assert [c.source for c in found[:4]] == ["ss_tag_frequency"] * 4
    prompts = [c.prompt for c in found]
    assert prompts.count("sks woman") == 1  # the folder's instance prompt is the trigger tag again
    assert "anna v2" in prompts and found[-1].prompt == "" and found[-1].source == "empty"
    assert len(found) == 9 and {c.source for c in found} >= {"generic"}


def test_without_metadata_generic_prompts_fill_in_and_bad_fields_are_ignored():
    found = candidate_prompts({"ss_tag_frequency": "not json", "ss_dataset_dirs": "[1, 2]"}, limit=3)
    assert [c.prompt for c in found] == [*GENERIC_PROMPTS[:3], ""]
    assert [c.prompt for c in candidate_prompts({}, generic=False)] == [""]


def test_kohya_folder_names_and_modelspec():
    assert folder_prompt("10_sks person") == "sks person" and folder_prompt("my_style") == "my style"
    found = candidate_prompts({"modelspec.trigger_phrase": "ohwx dog", "modelspec.title": "My Dog"}, generic=False)
    assert [(c.prompt, c.source) for c in found] == [("ohwx dog", "modelspec"), ("My Dog", "modelspec"),
                                                     ("", "empty")]
