"""Candidate prompts for a data-free scan: what a LoRA was probably trained on, read from its own file.

A platform gets the LoRA and its base, never the training images or captions. Trainers leave traces in the
safetensors header, and they are the best guess at the prompts under which a LoRA could reproduce a training
image:

- kohya sd-scripts' `ss_tag_frequency`: `{dataset folder: {tag: count}}`, the comma-separated caption pieces of
  every training caption with how many captions held each. A tag that appears in every caption of a folder is a
  trigger word; the most frequent tags joined give a caption typical of the folder.
- `ss_dataset_dirs`: `{folder: {"n_repeats": n, "img_count": m}}`; kohya's folder convention `<repeats>_<name>`
  puts the instance prompt (e.g. "sks person") after the repeats.
- modelspec's `modelspec.trigger_phrase` and `modelspec.title`, and sd-scripts' `ss_output_name`.

Without any of these, the scan falls back to generic prompts of the LoRA's family, and always adds the empty
prompt: a LoRA that memorized an image often returns it unprompted (Somepalli et al. 2023; Carlini et al. 2023
extract from Stable Diffusion with the training captions, which the metadata approximates).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

#: Prompts tried when the metadata names nothing: subjects fine-tunes are most often made of.
GENERIC_PROMPTS = ("a photo of a person", "a portrait photo", "a photo of a face", "an illustration",
                   "a photo", "a painting")
#: kohya's dataset folder names: "<repeats>_<instance prompt>".
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class CandidatePrompt:
    """One prompt to scan and where it comes from ("ss_tag_frequency", "ss_dataset_dirs", "modelspec",
    "ss_output_name", "generic", "empty")."""

    prompt: str
    source: str


def parse_json_field(metadata: Mapping[str, str], key: str) -> dict:
    """A JSON object stored in a metadata field, or {} when it is absent or not a JSON object (metadata is
    written by many tools; a malformed field is ignored, not fatal)."""
    try:
        value = json.loads(metadata.get(key, "") or "{}")
    except (json.JSONDecodeError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def folder_prompt(folder: str) -> str:
    """The instance prompt of a kohya dataset folder name ("10_sks person" -> "sks person"; other names as given,
    underscores read as spaces)."""
    match = KOHYA_FOLDER.match(folder.strip())
    return (match.group(2) if match else folder).replace("_", " ").strip()


def tag_prompts(tag_frequency: Mapping[str, Mapping[str, int]], tags_per_prompt: int = 6) -> list[str]:
    """From `ss_tag_frequency`: per dataset folder, its most frequent tags joined as one caption, then each tag
    that appears in at least half of the folder's captions on its own (trigger words, names)."""
    prompts = []
    for tags in tag_frequency.values():
        counts = {str(tag).strip(): int(count) for tag, count in tags.items()
                  if str(tag).strip() and isinstance(count, int | float)}
        if not counts:
            continue
        ranked = sorted(counts, key=lambda tag: (-counts[tag], tag))
        prompts.append(", ".join(ranked[:tags_per_prompt]))
        top = counts[ranked[0]]
        prompts += [tag for tag in ranked if counts[tag] * 2 >= top]
    return prompts


def candidate_prompts(metadata: Mapping[str, str], limit: int = 16, generic: bool = True) -> list[CandidatePrompt]:
    """The prompts a scan tries for a LoRA with header `metadata`, most specific first, without duplicates,
    at most `limit` plus the empty prompt (always last). Generic prompts fill in only when the metadata names
    fewer than `limit` (and `generic` is set)."""
    found: list[CandidatePrompt] = []

    def add(prompt: str, source: str) -> None:
        prompt = " ".join(str(prompt).split())
        if prompt and prompt.lower() not in {c.prompt.lower() for c in found}:
            found.append(CandidatePrompt(prompt, source))

    for prompt in tag_prompts(parse_json_field(metadata, "ss_tag_frequency")):
        add(prompt, "ss_tag_frequency")
    for folder in parse_json_field(metadata, "ss_dataset_dirs"):
        add(folder_prompt(folder), "ss_dataset_dirs")
    for key in ("modelspec.trigger_phrase", "modelspec.title"):
        add(metadata.get(key, ""), "modelspec")
    add(str(metadata.get("ss_output_name", "")).replace("_", " "), "ss_output_name")
    if generic:
        for prompt in GENERIC_PROMPTS:
            if len(found) >= limit:
                break
            add(prompt, "generic")
    return [*found[:limit], CandidatePrompt("", "empty")]
