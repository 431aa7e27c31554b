"""`sdtorch generate` with LoRAs and embeddings: --lora-dir/--embeddings-dir, the hashes in the PNG text, and
--from re-applying them (a clear error when a file is missing)."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, tiny_models
from sdtorch.cli import main
from test_lora import kohya_file

FAST = ["--steps", "2", "--width", "32", "--height", "32", "--quiet", "--seed", "5"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sdtorch.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("cli")
    save_checkpoint(tiny_models(), root / "tiny.safetensors", config=TINY)
    (root / "loras").mkdir()
    (root / "emb").mkdir()
    kohya_file(root / "loras" / "ink.safetensors", tiny_models())
    torch.save({"string_to_param": {"*": torch.randn(2, TINY.clip.hidden_size)}}, root / "emb" / "glowy.pt")
    return root


def generate(files, out, *args):
    return main(["generate", *args, "--model", str(files / "tiny.safetensors"), "-o", str(out), *FAST])


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_lora_and_embedding_from_the_cli_and_back_from_the_png(files, tmp_path, capsys):
    dirs = ["--lora-dir", str(files / "loras"), "--embeddings-dir", str(files / "emb")]
    assert generate(files, tmp_path / "a.png", "a glowy cat <lora:ink:0.6>", *dirs) == 0
    assert generate(files, tmp_path / "plain.png", "a glowy cat", "--lora-dir", str(files / "loras")) == 0
    with Image.open(tmp_path / "a.png") as im:
        text = im.info["parameters"]
    assert "<lora:ink:0.6>" in text and 'Lora hashes: "ink: ' in text and 'TI hashes: "glowy: ' in text
    assert np.abs(pixels(tmp_path / "a.png") - pixels(tmp_path / "plain.png")).max() > 8
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--model", str(files / "tiny.safetensors"),
                 "-o", str(tmp_path / "b.png"), "--quiet", *dirs]) == 0
    assert (pixels(tmp_path / "a.png") == pixels(tmp_path / "b.png")).all()
    capsys.readouterr()
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--model", str(files / "tiny.safetensors"),
                 "-o", str(tmp_path / "c.png"), "--quiet", "--lora-dir", str(files / "loras")]) == 2
    assert "embedding 'glowy'" in capsys.readouterr().err
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--model", str(files / "tiny.safetensors"),
                 "-o", str(tmp_path / "c.png"), "--quiet", "--embeddings-dir", str(files / "emb"),
                 "--lora-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LoRA 'ink' not found" in err
