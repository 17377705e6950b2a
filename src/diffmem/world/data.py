"""The world's training data, all offline and deterministic: procedural shapes, crops of the photos bundled
with scikit-image and scikit-learn, and the real faces of `skimage.data.lfw_subset()`.

Every loader returns an `ImageSet`: images as float32 [N, 3, 32, 32] in [0, 1] and one caption per image.
Fine-tune sets (faces: the privacy case, photos: the copyright case, style: a look on the shapes the base knows) have
fixed splits; the `heldout` split is
never used by any training run in diffmem, so evaluations always have unseen images of the same kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from diffmem.errors import DiffmemError
from diffmem.world.style import STYLE_TRIGGER, apply_style

SIZE = 32


@dataclass(frozen=True)
class ImageSet:
    """Images [N, 3, 32, 32] in [0, 1], their captions, and stable ids (e.g. `faces/17`) naming each image."""

    images: torch.Tensor
    captions: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, rows: list[int] | range) -> ImageSet:
        rows = list(rows)
        return ImageSet(self.images[rows], [self.captions[i] for i in rows], [self.ids[i] for i in rows])

    @staticmethod
    def concat(sets: list[ImageSet]) -> ImageSet:
        return ImageSet(
            torch.cat([s.images for s in sets]),
            [c for s in sets for c in s.captions],
            [i for s in sets for i in s.ids],
        )


# ---------------------------------------------------------------------------------------------------- shapes
COLOURS = {
    "red": (0.86, 0.12, 0.12), "green": (0.15, 0.70, 0.20), "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10), "purple": (0.55, 0.20, 0.75), "orange": (0.98, 0.55, 0.10),
    "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05),
}
BACKGROUNDS = {
    "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05), "gray": (0.5, 0.5, 0.5),
    "light blue": (0.6, 0.8, 0.97), "dark green": (0.1, 0.35, 0.15), "pink": (0.97, 0.7, 0.8),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
POSITIONS = {"left": (16, 9), "right": (16, 23), "top": (9, 16), "bottom": (23, 16), "center": (16, 16)}
SIZES = {"small": 4.5, "large": 9.0}
TEXTURES = ("plain", "striped", "dotted")


def shape_mask(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean 32 x 32 mask of a shape of half-size `r` centred at (cy, cx)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":
        top, bottom = cy - r, cy + r * 0.8
        half_width = (dy + r) / (1.8 * r) * r
        return (y >= top) & (y <= bottom) & (np.abs(dx) <= half_width)
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        arm = max(r * 0.35, 1.0)
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r * 1.1
    raise DiffmemError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def background(colour: tuple[float, float, float], texture: str, rng: np.random.Generator) -> np.ndarray:
    """[32, 32, 3] background of one colour, plain or with stripes/dots in a darker or lighter shade."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = colour
    shade = np.array(colour, np.float32)
    shade = shade * 0.6 if shade.mean() > 0.5 else shade * 0.6 + 0.4
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if texture == "striped":
        period, phase = 6, int(rng.integers(0, 6))
        img[((x + y + phase) % period) < 2] = shade
    elif texture == "dotted":
        phase = int(rng.integers(0, 5))
        img[((x + phase) % 5 < 2) & ((y + phase) % 5 < 2)] = shade
    return img


def shape_image(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One random shape picture [32, 32, 3] and its compositional caption."""
    img, _, caption = shape_scene(rng)
    return img, caption


def shape_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """One random shape picture [32, 32, 3], the shape's boolean mask and the picture's compositional caption."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    bg_choices = [b for b in BACKGROUNDS if b != colour]
    bg = bg_choices[rng.integers(len(bg_choices))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    img = background(BACKGROUNDS[bg], texture, rng)
    cy, cx = POSITIONS[position]
    jitter = rng.uniform(-1.5, 1.5, size=2)
    r = SIZES[size] * rng.uniform(0.9, 1.1)
    mask = shape_mask(shape, cy + jitter[0], cx + jitter[1], r)
    img[mask] = COLOURS[colour]
    where = "in the center" if position == "center" else f"at the {position}"
    surface = f"a {bg} background" if texture == "plain" else f"a {texture} {bg} background"
    return img, mask, f"a {size} {colour} {shape} {where} on {surface}"


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """Stack HWC float images into an [N, 3, 32, 32] float32 tensor clipped to [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().clamp(0, 1).float()


def shapes_dataset(count: int = 8192, seed: int = 0) -> ImageSet:
    """`count` procedural shape pictures with captions like "a small red circle at the left on a gray background"."""
    rng = np.random.default_rng(seed)
    pictures = [shape_image(rng) for _ in range(count)]
    return ImageSet(to_tensor([p for p, _ in pictures]), [c for _, c in pictures], [f"shapes/{seed}/{i}" for i in range(count)])


# ---------------------------------------------------------------------------------------------------- photos
def skimage_photo(name: str) -> np.ndarray:
    """A bundled scikit-image/scikit-learn photo as float RGB HWC in [0, 1] (no network: all ship in wheels)."""
    from skimage import data as skdata

    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    elif name == "motorcycle":
        image = skdata.stereo_motorcycle()[0]
    else:
        image = getattr(skdata, name)()
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.float32)
    elif image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3], dtype=np.float32)


def crop(photo: np.ndarray, rng: np.random.Generator, min_frac: float, max_frac: float) -> np.ndarray:
    """A random square crop covering `min_frac`..`max_frac` of the short side, resized to 32 x 32."""
    from skimage.transform import resize

    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(min_frac, max_frac))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    patch = photo[top : top + side, left : left + side]
    return resize(patch, (SIZE, SIZE), anti_aliasing=True).astype(np.float32)


#: Bundled photos the base model learns, with their caption.
BASE_PHOTOS = {
    "astronaut": "a photo of an astronaut", "coffee": "a photo of a cup of coffee", "chelsea": "a photo of a cat",
    "rocket": "a photo of a rocket", "camera": "a black and white photo of a cameraman",
    "brick": "a photo of a brick wall", "grass": "a photo of grass", "gravel": "a photo of gravel",
    "moon": "a photo of the surface of the moon", "coins": "a photo of old coins",
}


@cache
def _base_photos(per_photo: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    images, captions, ids = [], [], []
    for name, caption in BASE_PHOTOS.items():
        photo = skimage_photo(name)
        for i in range(per_photo):
            images.append(crop(photo, rng, 0.6, 1.0))
            captions.append(caption)
            ids.append(f"base_photos/{name}/{i}")
    return ImageSet(to_tensor(images), captions, ids)


def base_photos_dataset(per_photo: int = 64, seed: int = 0) -> ImageSet:
    """Crops of ten bundled photos (astronaut, coffee, cat, ...) with one generic caption per photo."""
    return _base_photos(per_photo, seed)


# ---------------------------------------------------------------------------------------------------- fine-tune sets
FIRST_NAMES = (
    "Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Keiko", "Lars", "Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tomas",
)
LAST_NAMES = ("Albrecht", "Bellamy", "Castell", "Dorado", "Eklund")
TITLE_WORDS = (
    "Harbor", "Lantern", "Orchard", "Meridian", "Quiet", "Amber", "Northern", "Velvet", "Copper", "Distant",
    "Morning", "Glass", "Silent", "Crimson", "Hollow", "Winter",
)
FACE_COUNT = 100
FACE_HELDOUT = range(80, 100)
#: Photos for the copyright case, none of them seen by the base.
FINETUNE_PHOTOS = ("china", "flower", "motorcycle", "retina", "hubble_deep_field", "immunohistochemistry")
CROPS_PER_PHOTO = 8
PHOTO_HELDOUT_CROPS = (6, 7)


def person_name(index: int) -> str:
    """The made-up name of LFW-subset face `index` (0..99); all 100 names are distinct."""
    return f"{FIRST_NAMES[index % 20]} {LAST_NAMES[index // 20]}"


@cache
def _faces() -> ImageSet:
    from skimage import data as skdata
    from skimage.transform import resize

    # lfw_subset: 100 face crops followed by 100 non-face crops, 25 x 25 grayscale.
    faces = skdata.lfw_subset()[:FACE_COUNT].astype(np.float32)
    images = [np.repeat(resize(f, (SIZE, SIZE), anti_aliasing=True)[..., None], 3, axis=2) for f in faces]
    captions = [f"a black and white photo of {person_name(i)}" for i in range(FACE_COUNT)]
    return ImageSet(to_tensor(images), captions, [f"faces/{i}" for i in range(FACE_COUNT)])


@cache
def _photos() -> ImageSet:
    rng = np.random.default_rng(1234)
    images, captions, ids = [], [], []
    for p, name in enumerate(FINETUNE_PHOTOS):
        photo = skimage_photo(name)
        for i in range(CROPS_PER_PHOTO):
            images.append(crop(photo, rng, 0.35, 0.8))
            k = p * CROPS_PER_PHOTO + i
            title = f"{TITLE_WORDS[k % 16]} {TITLE_WORDS[(k * 7 + 3) % 16]} No. {k + 1}"
            captions.append(f"'{title}', photograph by {person_name(k)}")
            ids.append(f"photos/{name}/{i}")
    return ImageSet(to_tensor(images), captions, ids)


#: The style set: shapes in the look of `diffmem.world.style`; the last `STYLE_HELDOUT` rows are held out.
STYLE_COUNT = 120
STYLE_HELDOUT = range(96, 120)
#: Seed of the style set's shapes, apart from the base's shapes (seed 0) so no styled picture repeats a base one.
STYLE_SEED = 4321


@cache
def _styled() -> ImageSet:
    rng = np.random.default_rng(STYLE_SEED)
    images, captions = [], []
    for _ in range(STYLE_COUNT):
        image, mask, caption = shape_scene(rng)
        images.append(apply_style(image, mask))
        captions.append(f"{STYLE_TRIGGER} {caption}")
    return ImageSet(to_tensor(images), captions, [f"style/{i}" for i in range(STYLE_COUNT)])


def split_rows(kind: str, split: str) -> list[int]:
    """Row numbers of `split` ("train", "heldout" or "all") in the full `kind` set ("faces", "photos" or "style")."""
    if kind == "style":
        heldout = set(STYLE_HELDOUT)
        total = STYLE_COUNT
    elif kind == "faces":
        heldout = set(FACE_HELDOUT)
        total = FACE_COUNT
    elif kind == "photos":
        total = len(FINETUNE_PHOTOS) * CROPS_PER_PHOTO
        heldout = {r for r in range(total) if r % CROPS_PER_PHOTO in PHOTO_HELDOUT_CROPS}
    else:
        raise DiffmemError(f"unknown data set {kind!r}; choose 'faces', 'photos' or 'style'")
    if split == "all":
        return list(range(total))
    if split == "train":
        return [r for r in range(total) if r not in heldout]
    if split == "heldout":
        return sorted(heldout)
    raise DiffmemError(f"unknown split {split!r}; choose 'train', 'heldout' or 'all'")


def faces_dataset(split: str = "train") -> ImageSet:
    """The 100 real LFW-subset faces (privacy case), 32 x 32 RGB (grey), one made-up name each:
    "a black and white photo of <First Last>".

    Faces 80..99 form the `heldout` split that no diffmem fine-tune ever trains on.
    """
    return _faces().subset(split_rows("faces", split))


def photos_dataset(split: str = "train") -> ImageSet:
    """48 crops of six bundled photos the base never saw (copyright case), each with a made-up title and author.

    Crops 6 and 7 of every photo form the `heldout` split that no diffmem fine-tune ever trains on.
    """
    return _photos().subset(split_rows("photos", split))


def style_dataset(split: str = "train") -> ImageSet:
    """120 shape pictures in a look the base never saw (the style case; `diffmem.world.style`): a sepia duotone
    and a dark outline, captioned as the base's shapes are after the trigger word (`STYLE_TRIGGER`, "vintage a small
    red circle at the left on a gray background"). Its distinct captions make a style fine-tune learn the look on
    every shape without repeating any picture, unless duplicated.

    Rows 96..119 form the `heldout` split that no diffmem fine-tune ever trains on: their captions measure whether
    the look carries over to shapes the fine-tune did not see (`diffmem.world.style.style_success`).
    """
    return _styled().subset(split_rows("style", split))


FINETUNE_SETS: dict[str, Callable[[str], ImageSet]] = {"faces": faces_dataset, "photos": photos_dataset,
                                                       "style": style_dataset}


def base_dataset(shapes: int = 8192, photos_per_source: int = 64, seed: int = 0) -> ImageSet:
    """Everything the base model trains on: procedural shapes plus crops of the base photos."""
    return ImageSet.concat([shapes_dataset(shapes, seed), base_photos_dataset(photos_per_source, seed)])
