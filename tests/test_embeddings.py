"""Textual-inversion embeddings: a name in the prompt gives exactly what the same vectors give as new tokens of the
text encoder (transformers' CLIP with its vocabulary extended by hand), and counts toward the 75-token chunks as
A1111 counts it."""
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY, tiny_models
from reference import max_rel_err, transformers_clip
from sdtorch.embeddings import EmbeddingLibrary, EmbeddingMatcher, read_embedding
from sdtorch.lora import NetworkError
from sdtorch.prompts import encode_prompt_pair, tokenize_prompt
from sdtorch.tokenizer import CLIPTokenizer

WIDTH = TINY.clip.hidden_size


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.default()


def vectors(n, seed=0):
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


def a1111_pt(path, vecs):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs}, "name": path.stem, "step": 100,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, path)


def matcher(folder, tokenizer):
    return EmbeddingMatcher(EmbeddingLibrary(folder), tokenizer, WIDTH)


@torch.no_grad()
def test_embedding_equals_its_vectors_as_new_tokens(tmp_path, tokenizer):
    """"a photo of shinystyle, red": the 3 vectors of shinystyle.pt replace the word's tokens; the reference gives
    transformers' CLIP three new vocabulary rows holding them and writes their ids where the word was."""
    models = tiny_models()
    vecs = vectors(3)
    a1111_pt(tmp_path / "shinystyle.pt", vecs)
    m = matcher(tmp_path, tokenizer)
    cond, uncond = encode_prompt_pair(models.text_encoder, tokenizer, "a photo of shinystyle, red", "", embeddings=m)
    assert list(m.used) == ["shinystyle"]

    reference = transformers_clip(models.state_dict(), TINY)
    vocab = reference.get_input_embeddings().weight.shape[0]
    reference.resize_token_embeddings(vocab + 3)
    reference.get_input_embeddings().weight[vocab:] = vecs
    ids = tokenizer.encode("a photo of ") + [vocab, vocab + 1, vocab + 2] + tokenizer.encode(", red")
    ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (77 - len(ids))
    expected = reference(torch.tensor([ids])).last_hidden_state
    assert max_rel_err(cond, expected) <= 1e-5
    plain = encode_prompt_pair(models.text_encoder, tokenizer, "a photo of shinystyle, red", "")[0]
    assert max_rel_err(plain, expected) > 1e-2  # without the folder the word is read as text


def test_an_embedding_takes_its_vectors_places_and_never_straddles_chunks(tmp_path, tokenizer):
    a1111_pt(tmp_path / "wide.pt", vectors(4))
    words = " ".join(["cat"] * 73)  # 73 tokens: 2 places left in the first chunk, too few for 4 vectors
    chunks = tokenize_prompt(tokenizer, words + " wide blue", embeddings=matcher(tmp_path, tokenizer))
    assert len(chunks) == 2
    assert chunks[0].fixes == [] and chunks[0].tokens[74] == tokenizer.eos_token_id
    assert [offset for offset, _ in chunks[1].fixes] == [0]
    assert chunks[1].tokens[1:6] == [0, 0, 0, 0, tokenizer.encode("blue")[0]]
    emphasised = tokenize_prompt(tokenizer, "(wide:1.5) blue", embeddings=matcher(tmp_path, tokenizer))[0]
    assert emphasised.multipliers[1:6] == [1.5] * 4 + [1.0]  # emphasis weighs each vector


def test_embedding_layouts(tmp_path, tokenizer):
    """A1111 .pt (string_to_param), .safetensors (emb_params), a diffusers concept (one (D,) vector)."""
    vecs = vectors(2)
    a1111_pt(tmp_path / "a.pt", vecs)
    save_file({"emb_params": vecs}, str(tmp_path / "b.safetensors"))
    torch.save({"<c>": vecs[0]}, tmp_path / "c.bin")
    assert torch.equal(read_embedding(tmp_path / "a.pt").vectors, vecs)
    assert torch.equal(read_embedding(tmp_path / "b.safetensors").vectors, vecs)
    assert torch.equal(read_embedding(tmp_path / "c.bin").vectors, vecs[:1])
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "xl.safetensors"))
    assert {k: v.shape for k, v in read_embedding(tmp_path / "xl.safetensors").vectors.items()} == {
        "clip_l": (2, 768), "clip_g": (2, 1280)}
    with pytest.raises(NetworkError, match="an SDXL embedding .* this text encoder is 32-wide"):
        tokenize_prompt(tokenizer, "xl", embeddings=matcher(tmp_path, tokenizer))
    save_file({"emb_params": torch.zeros(2, 1024)}, str(tmp_path / "sd2emb.safetensors"))
    with pytest.raises(NetworkError, match="SD 2.x"):
        tokenize_prompt(tokenizer, "sd2emb", embeddings=matcher(tmp_path, tokenizer))


def test_a_pickled_embedding_that_would_run_code_is_refused(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"string_to_param": {"*": Evil()}}))
    with pytest.raises(NetworkError, match="refused"):
        read_embedding(tmp_path / "evil.pt")


def test_ti_hash_is_the_whole_files_sha256(tmp_path):
    a1111_pt(tmp_path / "s.pt", vectors(1))
    assert read_embedding(tmp_path / "s.pt").short_hash == \
        hashlib.sha256((tmp_path / "s.pt").read_bytes()).hexdigest()[:12]


@torch.no_grad()
def test_an_sdxl_embedding_gives_each_tower_its_own_vectors(tmp_path, tokenizer):
    """{"clip_l": (n, 768), "clip_g": (n, 1280)} (here 64 and 128 wide, the tiny SDXL's towers): the ViT-L tower
    reads clip_l in the word's place, bigG reads clip_g, and the pooled text is bigG's with them; the reference writes
    each tower's vectors into its token embeddings by hand."""
    from reference import randomize_
    from sdtorch import conditioning
    from sdtorch.models import StableDiffusionModels
    from conftest import TINY_SDXL

    models = randomize_(StableDiffusionModels(TINY_SDXL), seed=5).eval()
    vecs = {"clip_l": torch.randn(2, 64), "clip_g": torch.randn(2, 128)}
    save_file(vecs, str(tmp_path / "xlstyle.safetensors"))
    m = EmbeddingMatcher(EmbeddingLibrary(tmp_path), tokenizer, TINY_SDXL.clip.hidden_size)
    c = conditioning.encode_prompts(models, conditioning.tokenizers(TINY_SDXL, tokenizer), TINY_SDXL,
                                    "a xlstyle cat", "", 1, ((64, 64), (0, 0), (64, 64)), embeddings=m)
    assert list(m.used) == ["xlstyle"]
    ids = [tokenizer.bos_token_id, *tokenizer.encode("a"), 0, 0, *tokenizer.encode("cat"), tokenizer.eos_token_id]
    for tower, name, pad, columns in ((models.text_encoders[0], "clip_l", tokenizer.eos_token_id, slice(0, 64)),
                                      (models.text_encoders[1], "clip_g", 0, slice(64, 192))):
        row = torch.tensor([ids + [pad] * (77 - len(ids))])
        token_embeds = tower.embeddings.token_embedding(row)
        token_embeds[0, 2:4] = vecs[name]  # after BOS and "a"
        hidden, pooled = tower.hidden_and_pooled(row, clip_skip=2, token_embeds=token_embeds)
        assert max_rel_err(c.cond[..., columns], hidden) <= 1e-5, name
    assert max_rel_err(c.y[:, :128], pooled) <= 1e-5  # bigG's pooled text
