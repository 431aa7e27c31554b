"""Training data: captioned image folders, the shapes data, augmentation, and the sharded, resumable batch order.

Every random choice in the data (crop offset, flip, caption dropout) and in the objectives (noise, timestep) comes
from a per-sample seed that the batch sampler derives from (run seed, epoch, index). So the batches of step s are a
pure function of (seed, s): resuming at step s needs no sampler state beyond the step, and N processes that each take
a slice of a global batch see exactly what one process sees when it takes the whole batch.
"""
import hashlib
import json
import random
import warnings
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..images import load_image, to_rgb
from .shapes import TWO_SHAPES_PROB, ShapesDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _is_readable_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()  # checks the header and, for PNG, every chunk's CRC, without decoding pixels
        return True
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
        return False


def scan_folder(root: str | Path) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(image, caption) pairs of a folder, and the unreadable images left out.

    Captions come from `metadata.jsonl` (Hugging Face imagefolder: one {"file_name", "text"} per line) when the
    folder has one, else from `name.txt` beside each `name.png` (any of IMAGE_EXTENSIONS, in subfolders too).
    Images without a caption are left out, with a warning.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist")
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        pairs = []
        for n, raw in enumerate(metadata.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{metadata}:{n}: not a line of UTF-8 JSON ({e.__class__.__name__})") from None
            if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) or "text" not in record:
                raise ValueError(f"{metadata}:{n}: each line must be an object with 'file_name' and 'text', got "
                                 f"{raw[:60].decode('utf-8', 'replace')!r}")
            pairs.append((root / record["file_name"], str(record["text"])))
    else:
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        uncaptioned = [p for p in images if not p.with_suffix(".txt").is_file()]
        if uncaptioned:
            warnings.warn(f"{len(uncaptioned)} images in {root} have no .txt caption and are left out "
                          f"(first: {uncaptioned[0].name})", stacklevel=2)
        pairs = [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images if p not in uncaptioned]
    good, bad = [], []
    for path, text in pairs:
        if _is_readable_image(path):
            good.append((path, text))
        else:
            bad.append(path)
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable or corrupt images in {root} (first: {bad[0].name})", stacklevel=2)
    return good, bad


class ImageCaptionFolder(Dataset):
    """A folder of captioned images (see `scan_folder`): item i is (PIL RGB image, caption)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.items, self.skipped = scan_folder(root)
        if not self.items:
            raise ValueError(f"no readable captioned images in {root}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        # An image that passed the scan can still fail to decode (a JPEG truncated mid-scan passes verify()). A
        # training run must not die for one file: warn and serve the next image instead, so batches stay full.
        for offset in range(len(self.items)):
            path, text = self.items[(index + offset) % len(self.items)]
            try:
                return to_rgb(load_image(path)), text  # upright (EXIF) and 16-bit greyscale scaled, as at inference
            except Exception as error:
                warnings.warn(f"could not decode {path} ({error}); using the next image instead", stacklevel=2)
        raise RuntimeError(f"no image in {self.root} could be decoded")


class TrainTransform:
    """(PIL image, caption, rng) -> ((3, size, size) tensor in [-1, 1], caption): resize the short side, crop, flip,
    and drop the caption (replace it by "") with probability `caption_dropout`, for classifier-free guidance."""

    def __init__(self, size: int, random_crop: bool = False, flip: bool = False, caption_dropout: float = 0.0):
        if size < 8:
            raise ValueError(f"image size must be at least 8, got {size}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.size, self.random_crop, self.flip, self.caption_dropout = size, random_crop, flip, caption_dropout

    def __call__(self, image: Image.Image, text: str, rng: random.Random) -> tuple[torch.Tensor, str]:
        s = self.size
        w, h = image.size
        scale = s / min(w, h)
        if scale != 1.0:
            image = image.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = image.size
        # draw every random number whether or not it is used, so turning one option on never shifts the others
        crop_x, crop_y, flip_u, drop_u = rng.randint(0, w - s), rng.randint(0, h - s), rng.random(), rng.random()
        left, top = (crop_x, crop_y) if self.random_crop else ((w - s) // 2, (h - s) // 2)
        image = image.crop((left, top, left + s, top + s))
        # Flipping mirrors "on the left" into "on the right" while the caption still says left: off by default.
        if self.flip and flip_u < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if drop_u < self.caption_dropout:
            text = ""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3) uint8
        return pixels.permute(2, 0, 1).float() / 127.5 - 1.0, text  # -> (3, H, W) in [-1, 1]


class TrainItems(Dataset):
    """Items keyed by (index, sample seed), as `ShardedBatchSampler` yields them: the seed drives the augmentation."""

    def __init__(self, source: Dataset, transform: TrainTransform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        image, text = self.source[index]
        pixels, text = self.transform(image, text, random.Random(seed))
        return {"image": pixels, "caption": text, "seed": seed}


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch, stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ShardedBatchSampler:
    """Endless batches of (index, sample seed) for one rank, starting at a given step.

    Epoch e is a permutation of all items drawn from (seed, e) (as torch's DistributedSampler does); global batch j
    of it is perm[j*B:(j+1)*B] and rank r takes every world_size-th element from position r, so the ranks' batches
    partition the global batch and no sample repeats within an epoch. The last incomplete global batch is dropped.
    """

    def __init__(self, length: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0):
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} must be a positive multiple of world size {world_size}")
        if length < global_batch:
            raise ValueError(f"the data has {length} items, fewer than one global batch of {global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.length, self.global_batch, self.rank, self.world_size = length, global_batch, rank, world_size
        self.seed, self.start_step = seed, start_step
        self.batches_per_epoch = length // global_batch

    def state(self, step: int) -> dict:
        """Where step `step` reads in the data: all that resuming needs (the order itself is recomputed)."""
        epoch, batch = divmod(step, self.batches_per_epoch)
        return {"seed": self.seed, "epoch": epoch, "batch": batch}

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = divmod(self.start_step, self.batches_per_epoch)
        while True:
            perm = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for j in range(batch, self.batches_per_epoch):
                chunk = perm[j * self.global_batch:(j + 1) * self.global_batch][self.rank::self.world_size]
                yield [(i, sample_seed(self.seed, epoch, i)) for i in chunk]
            epoch, batch = epoch + 1, 0


class Collate:
    """Stack items into a batch: image (B, 3, H, W), caption list, seed (B,) int64, and token ids (B, L) when a
    tokenizer is given (tokenizing here runs it in the data-loader workers, beside the image decoding)."""

    def __init__(self, tokenizer: Callable | None = None, max_length: int = 77):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict]) -> dict:
        batch = {
            "image": torch.stack([item["image"] for item in items]),
            "caption": [item["caption"] for item in items],
            "seed": torch.tensor([item["seed"] for item in items], dtype=torch.int64),
        }
        if self.tokenizer is not None:
            batch["ids"] = self.tokenizer(batch["caption"], max_length=self.max_length)
        return batch


def open_source(data: str, data_size: int = 0, resolution: int = 64, seed: int = 0,
                two_shapes_prob: float = TWO_SHAPES_PROB, keep: int = 0) -> Dataset:
    """The (PIL image, caption) source named by `data`: a folder path, or "shapes" for `data_size` procedural items
    (`two_shapes_prob` of them with two shapes; up to `keep` of them remembered once drawn)."""
    if data == "shapes":
        if data_size < 1:
            raise ValueError("--data shapes needs --data-size N (the number of procedural items), N >= 1")
        return ShapesDataset(data_size, seed=seed, size=resolution, two_shapes_prob=two_shapes_prob, keep=keep)
    return ImageCaptionFolder(data)


def split_holdout(source: Dataset, count: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, held-out) parts: `count` items chosen by `seed` are held out. Shapes data is endless, so its held-out
    part is fresh items from another seed rather than a slice of the training items."""
    if count < 0:
        raise ValueError(f"held-out count must be non-negative, got {count}")
    if isinstance(source, ShapesDataset):
        return source, ShapesDataset(count, seed=source.seed + 1_000_003, size=source.size,
                                     two_shapes_prob=source.two_shapes_prob)
    if count >= len(source):
        raise ValueError(f"cannot hold out {count} of {len(source)} items and still train: lower --holdout")
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:count])
    train = sorted(order[count:])
    return torch.utils.data.Subset(source, train), torch.utils.data.Subset(source, held)
