"""Image-conditioned preference data: records, validation, the corrupted image of mDPO, a built-in set.

Rows follow TRL's vision preference format, one image per row:

    {"images": ["img/cat.png"], "prompt": "What is on the mat?", "chosen": " A cat.", "rejected": " A dog."}
    {"image": "img/cat.png", "prompt": ..., "chosen": ..., "rejected": ...}       # the same
    {"images": [...], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is on the mat?"}]}],
     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}], "rejected": ...}

An image is a path to a PNG/JPEG/... file that PIL reads; a relative path is resolved against the
folder of the data file (of the dataset directory for ``save_to_disk`` folders, the working directory
for hub datasets). The image's place in the prompt is the placeholder ``<image>`` (or a typed
``{"type": "image"}`` part); without one the image goes before the prompt (before the text of its
first user message). Every image is opened and decoded when the data loads, so a missing or
unreadable file is a ``DataError`` naming the file, row and field before any model loads.

``builtin:tiny_colour_images`` is generated on first use into the cache: squares of four colours
on grey, where the chosen answer names the square's colour and the rejected one another colour.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from preftune.data.loaders import read_rows
from preftune.data.records import DataError, PairRecord, is_conversational, type_name
from preftune.data.validate import Where, row_to_pair
from preftune.models.cache import atomic_dir, cache_dir

IMAGE_PLACEHOLDER = "<image>"
BUILTIN_PREFIX = "builtin:"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20)}


@dataclass(frozen=True)
class ImagePairRecord:
    """A preference conditioned on one image. ``pair.prompt`` holds exactly one ``<image>`` placeholder."""

    pair: PairRecord
    image: str  # absolute path of the image file
    image_hash: str  # sha256 of the decoded pixels: identifies the image in caches and corruption seeds
    size: tuple[int, int]  # (width, height) in pixels
    row: int | None = field(default=None, compare=False, repr=False)


# ----------------------------------------------------------------------------------------- images


def open_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an RGB image (PIL opens lazily; decoding catches truncated files)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def pixels_hash(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.width}x{image.height}|".encode() + image.tobytes()).hexdigest()


def corruption_box(width: int, height: int, *, key: str, keep_min: float, keep_max: float) -> tuple[int, int, int, int]:
    """The crop (left, top, right, bottom) that makes mDPO's corrupted image m' of one example.

    A rectangle of the image's aspect ratio covering a fraction of its area drawn uniformly from
    [keep_min, keep_max], at a uniformly drawn position. The draws come from sha256(``key``), so the
    same example always gets the same crop (its reference log-probs can be cached; resume is exact)
    on any machine and Python version.
    """
    if not 0.0 < keep_min <= keep_max <= 1.0:
        raise ValueError(f"need 0 < keep_min <= keep_max <= 1, got {keep_min} and {keep_max}")
    digest = hashlib.sha256(key.encode()).digest()
    u = [int.from_bytes(digest[8 * i : 8 * i + 8], "big") / 2**64 for i in range(3)]
    scale = (keep_min + (keep_max - keep_min) * u[0]) ** 0.5
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = int(u[1] * (width - w + 1)), int(u[2] * (height - h + 1))
    return left, top, left + w, top + h


# ------------------------------------------------------------------------------------ validation


def _content_text(content: Any, where: Where, field: str, allow_image: bool) -> Any:
    """TRL's typed content ``[{"type": "text", "text": ...}, {"type": "image"}]`` -> a string with the
    image placeholder; plain strings (and anything malformed, for row_to_pair to report) pass through."""
    if not isinstance(content, list):
        return content
    parts = []
    for i, part in enumerate(content, start=1):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image" and allow_image:
            parts.append(IMAGE_PLACEHOLDER)
        else:
            allowed = "'text' or 'image'" if allow_image else "'text'"
            raise where.error(f"content part {i}: expected an object with type {allowed}, got "
                              f"{type_name(part) if kind is None else repr(kind)}", field)  # fmt: skip
    return "".join(parts)


def _flatten(value: Any, where: Where, field: str) -> Any:
    if not is_conversational(value):
        return value
    allow_image = field == "prompt"
    return [{**m, "content": _content_text(m.get("content"), where, field, allow_image)} if isinstance(m, dict) else m
            for m in value]  # fmt: skip


def _placeholders(value: Any) -> int:
    if isinstance(value, str):
        return value.count(IMAGE_PLACEHOLDER)
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in value)


def _with_placeholder(prompt: Any, where: Where) -> Any:
    """The prompt with exactly one image placeholder (added in front when it has none)."""
    count = _placeholders(prompt)
    if count > 1:
        raise where.error(f"the prompt has {count} image placeholders {IMAGE_PLACEHOLDER!r}; each row "
                          f"is conditioned on exactly one image", "prompt")  # fmt: skip
    if count == 1:
        return prompt
    if isinstance(prompt, str):
        return f"{IMAGE_PLACEHOLDER}\n{prompt}" if prompt else IMAGE_PLACEHOLDER
    k = next((i for i, m in enumerate(prompt) if m["role"] == "user"), None)
    if k is None:
        raise where.error("the prompt has no user message to put the image in", "prompt")
    return [*prompt[:k], {**prompt[k], "content": f"{IMAGE_PLACEHOLDER}\n{prompt[k]['content']}"}, *prompt[k + 1 :]]


def _image_path(row: dict, where: Where) -> tuple[str, str]:
    """(field name, path as written) of the row's one image."""
    if row.get("images") is not None:
        images = row["images"]
        if not isinstance(images, list):
            raise where.error(f"expected a list of image paths, got {type_name(images)} (use 'image' for "
                              f"a single path)", "images")  # fmt: skip
        if len(images) != 1:
            raise where.error(f"expected exactly one image per row, got {len(images)}", "images")
        field, value = "images", images[0]
    elif row.get("image") is not None:
        field, value = "image", row["image"]
    else:
        has = ", ".join(repr(k) for k, v in row.items() if v is not None) or "none"
        raise where.error(f"missing field; expected 'images' (a list with one image path) or 'image', the "
                          f"row has {has}", "images")  # fmt: skip
    if not isinstance(value, str) or not value:
        raise where.error(f"expected a path to an image file (a non-empty string), got {type_name(value)}", field)
    return field, value


def row_to_image_pair(row: dict, where: Where, base: Path) -> ImagePairRecord:
    """Validate one row (text fields as ``row_to_pair``, then the image) into an ImagePairRecord."""
    field, written = _image_path(row, where)
    text = dict(row)
    for key in ("prompt", "chosen", "rejected"):
        if key in text:
            text[key] = _flatten(text[key], where, key)
    pair = row_to_pair(text, where)
    for name in ("chosen", "rejected"):
        if _placeholders(getattr(pair, name)):
            raise where.error(f"image placeholders {IMAGE_PLACEHOLDER!r} belong in the prompt only", name)
    pair = PairRecord(_with_placeholder(pair.prompt, where), pair.chosen, pair.rejected, row=where.row)
    path = (base / Path(written).expanduser()).resolve()
    if not path.is_file():
        raise where.error(f"image file not found: {str(path)!r}" + ("" if Path(written).is_absolute() else
                          f" ({written!r} is resolved against {str(base)!r})"), field)  # fmt: skip
    try:
        image = open_image(path)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise where.error(f"cannot read image file {str(path)!r}: {type(err).__name__}: {err}", field) from None
    return ImagePairRecord(pair, str(path), pixels_hash(image), image.size, row=where.row)


def _base_dir(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path.parent.resolve()
    if path.is_dir():
        return path.resolve()
    return Path.cwd()


def load_image_pairs(source: str, *, split: str = "train") -> list[ImagePairRecord]:
    """Read ``source`` (any format ``read_rows`` reads, or ``builtin:tiny_colour_images``) and validate
    every row into an ImagePairRecord; identical chosen/rejected pairs are errors (no signal)."""
    source = str(source)
    path = builtin_image_dataset(source) if source.startswith(BUILTIN_PREFIX) else None
    base = _base_dir(str(path) if path is not None else source)
    records = []
    for row_no, row in read_rows(str(path) if path is not None else source, split=split):
        where = Where(source, row_no)
        record = row_to_image_pair(row, where, base)
        if record.pair.chosen == record.pair.rejected:
            raise where.error("'chosen' and 'rejected' are identical: the pair carries no preference", "rejected")
        records.append(record)
    return records


# ------------------------------------------------------------------------------ built-in dataset

BUILTIN_IMAGE_DATASETS = ("tiny_colour_images",)
_COLOUR_ROWS, _COLOUR_IMAGE_SIZE, _SQUARE = 48, 64, 28
_COLOUR_VERSION = 1  # bump when the generated files change


def builtin_image_dataset(source: str) -> Path:
    """``builtin:tiny_colour_images`` -> its JSONL file, generated once into the cache."""
    name = source[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_IMAGE_DATASETS:
        raise DataError(f"no built-in image dataset {name!r}; available: {', '.join(BUILTIN_IMAGE_DATASETS)}",
                        source=source)  # fmt: skip
    folder = cache_dir() / "datasets" / f"{name}-v{_COLOUR_VERSION}"
    if not (folder / "pairs.jsonl").is_file():
        with atomic_dir(folder) as tmp:
            write_colour_images(tmp)
    return folder / "pairs.jsonl"


def write_colour_images(folder: Path, n: int = _COLOUR_ROWS) -> Path:
    """Write ``n`` rows: a 64x64 grey image with a 28x28 square of one colour (cycling through
    COLOURS) at a position fixed by the row; chosen = " <colour>", rejected = another colour (each
    colour is rejected as often as chosen, so only the image tells the answers apart)."""
    names = list(COLOURS)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, wrong = names[i % 4], names[(i % 4 + 1 + (i // 4) % 3) % 4]
        digest = hashlib.sha256(f"square|{i}".encode()).digest()
        x, y = (digest[k] % (_COLOUR_IMAGE_SIZE - _SQUARE + 1) for k in (0, 1))
        image = Image.new("RGB", (_COLOUR_IMAGE_SIZE, _COLOUR_IMAGE_SIZE), (128, 128, 128))
        image.paste(COLOURS[colour], (x, y, x + _SQUARE, y + _SQUARE))
        file = f"images/{i:03d}_{colour}.png"
        image.save(folder / file)
        rows.append({"images": [file], "prompt": "What colour is the square?", "chosen": f" {colour}",
                     "rejected": f" {wrong}"})  # fmt: skip
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
