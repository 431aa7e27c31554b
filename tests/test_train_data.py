"""Training data: caption folders in both conventions, corrupt files, augmentation, and the sharded batch order."""
import json
import random
import warnings

import pytest
import torch
from PIL import Image

from sdtorch.train.data import (Collate, ImageCaptionFolder, ShardedBatchSampler, TrainItems, TrainTransform,
                                open_source, sample_seed, split_holdout)
from sdtorch.train.shapes import ShapesDataset


def _image(color, size=(40, 24)) -> Image.Image:
    return Image.new("RGB", size, color)


@pytest.fixture
def txt_folder(tmp_path):
    """Three good png+txt pairs (one in a subfolder), a truncated PNG, a text file named .png, an uncaptioned image."""
    (tmp_path / "sub").mkdir()
    for name, color in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("sub/c", (0, 0, 255))):
        _image(color).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"caption {name}\n")
    _image((1, 2, 3)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "whole.png").unlink()
    (tmp_path / "truncated.txt").write_text("broken")
    (tmp_path / "notimage.png").write_text("this is not a PNG")
    (tmp_path / "notimage.txt").write_text("broken too")
    _image((9, 9, 9)).save(tmp_path / "nocaption.png")
    return tmp_path


def test_txt_pairs_skip_corrupt_and_uncaptioned_images(txt_folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = ImageCaptionFolder(txt_folder)
    assert sorted(text for _, text in folder.items) == ["caption a", "caption b", "caption sub/c"]
    assert sorted(p.name for p in folder.skipped) == ["notimage.png", "truncated.png"]
    messages = " ".join(str(w.message) for w in caught)
    assert "skipped 2 unreadable" in messages and "1 images" in messages and "no .txt caption" in messages
    image, text = folder[0]
    assert image.mode == "RGB" and image.size == (40, 24) and text == "caption a"


def test_metadata_jsonl_folder(tmp_path):
    _image((10, 20, 30)).save(tmp_path / "x.png")
    _image((30, 20, 10)).save(tmp_path / "y.jpg")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    lines = [{"file_name": "x.png", "text": "first"}, {"file_name": "y.jpg", "text": "second"},
             {"file_name": "bad.png", "text": "corrupt"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        folder = ImageCaptionFolder(tmp_path)
    assert [text for _, text in folder.items] == ["first", "second"]
    assert folder[1][0].getpixel((0, 0)) == pytest.approx((30, 20, 10), abs=2)  # JPEG is lossy


def test_bad_folders_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "missing")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png"}\n')
    with pytest.raises(ValueError, match="'file_name' and 'text'"):
        ImageCaptionFolder(tmp_path)
    with pytest.raises(ValueError, match="--data-size"):
        open_source("shapes", 0)


@pytest.mark.filterwarnings("ignore:.*no .txt caption", "ignore:skipped 2 unreadable")
def test_image_that_fails_to_decode_later_is_replaced_by_the_next(txt_folder):
    folder = ImageCaptionFolder(txt_folder)
    folder.items[0][0].write_bytes(b"gone")  # passed the scan, then broke
    with pytest.warns(UserWarning, match="could not decode"):
        image, text = folder[0]
    assert text == "caption b" and image.getpixel((0, 0)) == (0, 255, 0)


def test_transform_resizes_crops_and_scales():
    image = Image.new("RGB", (40, 24))
    image.paste((255, 255, 255), (0, 0, 20, 24))  # left half white
    pixels, text = TrainTransform(16)(image, "on the left", random.Random(0))
    assert pixels.shape == (3, 16, 16) and text == "on the left"
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    # center crop of the 27x16 resize keeps white on the left: flipping is off by default
    assert pixels[:, :, 0].mean() == 1.0 and pixels[:, :, -1].mean() == -1.0
    flipped = [TrainTransform(16, flip=True)(image, "", random.Random(s))[0][0, 0, 0].item() for s in range(20)]
    assert set(flipped) == {-1.0, 1.0}  # some flipped, some not
    crops = {TrainTransform(16, random_crop=True)(image, "", random.Random(s))[0].sum().item() for s in range(20)}
    assert len(crops) > 1
    assert TrainTransform(16, caption_dropout=1.0)(image, "text", random.Random(0))[1] == ""
    with pytest.raises(ValueError):
        TrainTransform(16, caption_dropout=1.5)


def test_items_are_a_function_of_index_and_seed():
    items = TrainItems(ShapesDataset(8, size=32), TrainTransform(32, random_crop=True, flip=True, caption_dropout=0.5))
    a, b = items[(3, 12345)], items[(3, 12345)]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["seed"] == 12345
    batch = Collate(lambda texts, max_length: torch.zeros(len(texts), max_length, dtype=torch.long), 7)([a, b])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["ids"].shape == (2, 7)
    assert batch["seed"].tolist() == [12345] * 2


def _epoch(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


def test_sampler_shards_partition_the_global_batch_and_never_repeat_in_an_epoch():
    n, batch = 50, 8  # 6 full global batches per epoch, 2 items dropped
    single = _epoch(ShardedBatchSampler(n, batch, seed=3), 12)
    first_epoch = [i for b in single[:6] for i, _ in b]
    assert len(set(first_epoch)) == 48  # no repeats within an epoch
    assert [i for b in single[6:] for i, _ in b] != first_epoch  # a new order each epoch
    shards = [_epoch(ShardedBatchSampler(n, batch, rank=r, world_size=2, seed=3), 12) for r in range(2)]
    for step in range(12):
        assert sorted(shards[0][step] + shards[1][step]) == sorted(single[step])
        assert len(shards[0][step]) == 4
    assert single[7][0][1] == sample_seed(3, 1, single[7][0][0])


def test_sampler_resumes_mid_epoch():
    whole = _epoch(ShardedBatchSampler(50, 8, seed=1), 15)
    assert _epoch(ShardedBatchSampler(50, 8, seed=1, start_step=9), 6) == whole[9:]
    assert ShardedBatchSampler(50, 8, seed=1).state(9) == {"seed": 1, "epoch": 1, "batch": 3}
    with pytest.raises(ValueError, match="multiple of world size"):
        ShardedBatchSampler(50, 9, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatchSampler(5, 8)


def test_holdout_split():
    train, held = split_holdout(ShapesDataset(20, seed=0, size=32), 5)
    assert len(train) == 20 and len(held) == 5 and held[0][1] != train[0][1]  # fresh items, another seed
    folder_like = torch.utils.data.TensorDataset(torch.arange(10))
    train, held = split_holdout(folder_like, 3, seed=0)
    assert sorted(train.indices + held.indices) == list(range(10)) and len(held) == 3
    with pytest.raises(ValueError):
        split_holdout(folder_like, 10)
