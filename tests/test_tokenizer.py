"""The CLIP tokenizer gives exactly the ids of transformers' CLIPTokenizer over the same vocabulary.

The reference is transformers 5.23's CLIPTokenizer, which is backed by the Rust `tokenizers` library (there is no slow
Python one any more). Its normalization is NFC, whitespace collapse and per-character lowercasing; it does NOT fix
text with ftfy nor HTML-unescape it, both of which OpenAI's original CLIP tokenizer does. SD pipelines all go through
transformers, so we match it (HTML unescaping is an opt-in, tested below).

Known limit: the reference classifies letters/digits with Unicode 16 tables (Oniguruma) and lowercases with Rust's
(Unicode 16); we use the `regex` package (Unicode 17) and Python's str.lower (Unicode 14 on Python 3.11). They agree
on every code point assigned by Unicode 14 (checked once over all 1.1M code points, outside this suite); ~17.5k
code points assigned in Unicode 15-17 can tokenize differently. The corpus therefore draws from long-assigned blocks.

Regenerate the corpus (deterministic) with: python tests/test_tokenizer.py
"""

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from sdtorch.tokenizer import DEFAULT_VOCAB, CLIPTokenizer

CORPUS_PATH = Path(__file__).parent / "data" / "tokenizer_corpus.txt"


# ---------------------------------------------------------------------------------------------------------------------
# The corpus: >= 1,000 varied strings, one per line. Strings never contain "\n" or "\r" (the line separators).

SUBJECTS = ["a cat", "an astronaut riding a horse", "a castle on a hill", "portrait of a woman", "a red fox",
            "cyberpunk city street", "a bowl of ramen", "an old fisherman", "a dragon", "mountain lake at dawn",
            "a robot reading a book", "still life with fruit", "a lighthouse in a storm", "two dogs playing",
            "a steampunk airship", "a medieval knight", "a cozy cabin interior", "a girl with a pearl earring"]
STYLES = ["oil painting", "watercolor", "digital art", "photorealistic", "8k", "highly detailed", "trending on "
          "artstation", "by greg rutkowski", "studio ghibli style", "unreal engine", "octane render", "bokeh",
          "cinematic lighting", "masterpiece", "best quality", "sharp focus", "concept art", "35mm film", "HDR",
          "volumetric fog", "golden hour", "ultra-detailed", "intricate", "matte painting", "by Alphonse Mucha"]
NEGATIVES = ["lowres", "bad anatomy", "bad hands", "text", "error", "missing fingers", "extra digit", "cropped",
             "worst quality", "jpeg artifacts", "signature", "watermark", "blurry", "deformed", "ugly"]
UNICODE_SNIPPETS = [
    "café crème brûlée", "naïve façade", "Ångström", "señor niño", "Ærøskøbing", "Straße", "GROẞE", "œuvre",
    "e\u0301le\u0300ve", "A\u030angstro\u0308m", "\u1100\u1161\u11a8", "ΟΔΟΣ ΣΟΦΙΑΣ", "Σ", "ὈΔΥΣΣΕΎΣ", "İstanbul",
    "ıiIİ", "МОСКВА москва", "Київ", "東京タワー", "猫の写真", "一只猫在月光下", "水墨画 山水", "서울의 밤",
    "ひらがな カタカナ ｶﾀｶﾅ", "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ１２３", "ﬁﬂﬀ ligatures", "ǅǈǋ titlecase", "ß ẞ ſ",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "გამარჯობა", "Ελληνικά", "Ճ Armenian ԱԲԳ",
    "😀", "🐱‍👤 ninja cat", "👩🏽‍🚀 astronaut", "🏳️‍🌈", "🇯🇵🇫🇷", "❤️ love", "🔥🔥🔥", "✨ sparkles ✨", "👍🏻👍🏿",
    "∑∫√∞ ≈ ≠", "½ ¾ ² ³ ⁴", "Ⅻ roman", "①②③", "€100 £50 ¥1000", "→ ← ↑ ↓", "© ® ™", "“quotes” ‘single’", "…",
    "—em dash–en dash", "«guillemets»", "𝓯𝓪𝓷𝓬𝔂 𝕥𝕖𝕩𝕥", "ℌ𝔢𝔩𝔩𝔬", "zero\u200bwidth", "bom\ufeffmark",
    "soft\u00adhyphen", "rtl\u202emark", "x\u0308\u0301\u0327", "Ǆ Ǉ", "ΐ ΰ", "ᾼ ῌ ῼ",
]
WHITESPACE = [" ", "  ", "   ", "\t", "\t\t", " \t ", "\u00a0", "\u3000", "\u2003", "\x0b", "\x0c", "\x1c", "\x1f",
              "\x85", "\u2028", "\u2029", "\u1680", "\u202f"]
ENTITIES = ["&amp;", "&lt;3", "&gt;", "&quot;", "&#39;", "&#x27;", "&amp;lt;", "&nbsp;", "&copy;", "&eacute;",
            "&#128512;", "&amp;amp;", "&lt;b&gt;bold&lt;/b&gt;", "&", "&&", "&;"]
SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|EndOfText|>", "<|endof", "text|>", "</w>",
            "<|endoftext|><|endoftext|>", "<|startoftext|>x<|endoftext|>"]
PUNCTUATION = ["3.14159", "1,000,000", "$5.99", "100%", "v2.1", "#hashtag", "@user", "C++", "don't", "it's", "I'M",
               "THEY'LL", "we've", "she'd", "you're", "'quoted'", "''", "'s", "rock'n'roll", "e-mail", "x=y+1",
               "http://example.com/a?b=c&d=e", "user@mail.org", "f(x) = x^2", "[1, 2, 3]", "{key: value}", "2024-01-31",
               "12:30pm", "4K", "1920x1080", "-1.5e-10", "0xFF", "!!!", "???", "...", "--no-preview", "~/path/to",
               "\\backslash\\", "|pipe|", "a_b_c", "semi;colon", "`code`", "**bold**", "<tag>", "1st 2nd 3rd 4th"]
EMPTYISH = ["", " ", "  ", "\t", ",", ".", "!", "a", "A", "1", "'", "\u00a0", "\u200b", ",,,", " , ", "()", "(:1.2)"]
# Long-assigned blocks (present since Unicode 1.1-6.0) for random code-point strings; see the module docstring.
RANDOM_BLOCKS = [(0x20, 0x7E), (0xA1, 0x24F), (0x250, 0x2FF), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
                 (0x531, 0x556), (0x5D0, 0x5EA), (0x621, 0x64A), (0x900, 0x97F), (0xE01, 0xE5B), (0x10A0, 0x10FA),
                 (0x1100, 0x11FF), (0x1E00, 0x1FFF), (0x2010, 0x2064), (0x20A0, 0x20B5), (0x2100, 0x214F),
                 (0x2190, 0x23FF), (0x2460, 0x27BF), (0x3000, 0x30FF), (0x4E00, 0x9FCC), (0xAC00, 0xD7A3),
                 (0xFB00, 0xFB06), (0xFF01, 0xFFEE), (0x1D400, 0x1D6A5), (0x1F300, 0x1F5FF), (0x1F600, 0x1F64F),
                 (0x1F900, 0x1F9FF), (0x20000, 0x2A6D6)]


def _weighted(rng: random.Random, term: str) -> str:
    """An A1111-style emphasis around a term: (x), ((x)), [x], (x:1.2)."""
    kind = rng.randrange(5)
    if kind == 0:
        return f"({term}:{rng.choice(['0.5', '0.8', '1.1', '1.2', '1.35', '1.5', '2'])})"
    return [term, f"({term})", f"(({term}))", f"[{term}]"][kind - 1]


def _sd_prompt(rng: random.Random, n_terms: int) -> str:
    terms = [rng.choice(SUBJECTS)] + [rng.choice(STYLES + NEGATIVES) for _ in range(n_terms)]
    return rng.choice([", ", ",", " ", ", ", " | ", " BREAK "]).join(_weighted(rng, t) for t in terms)


def _random_codepoints(rng: random.Random, n: int) -> str:
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(RANDOM_BLOCKS)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def build_corpus() -> list[str]:
    """The test corpus: typical and over-long SD prompts, unicode, whitespace, entities, special tokens, edge cases."""
    rng = random.Random(1234)
    lines = list(EMPTYISH) + SUBJECTS + UNICODE_SNIPPETS + ENTITIES + SPECIALS + PUNCTUATION
    lines += [_sd_prompt(rng, rng.randint(1, 12)) for _ in range(300)]
    lines += [_sd_prompt(rng, rng.randint(40, 120)) for _ in range(40)]  # far over 75 tokens: truncation
    lines += [_random_codepoints(rng, rng.randint(1, 40)) for _ in range(200)]
    pools = [SUBJECTS, STYLES, UNICODE_SNIPPETS, WHITESPACE, ENTITIES, SPECIALS, PUNCTUATION, EMPTYISH]
    for _ in range(350):  # mixtures, glued with or without whitespace
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(2, 8))]
        glue = [rng.choice(["", " "] + WHITESPACE) for _ in parts]
        lines.append("".join(g + p for g, p in zip(glue, parts, strict=True)))
    lines += [" ".join([rng.choice(UNICODE_SNIPPETS)] * rng.randint(10, 40)) for _ in range(20)]  # long unicode
    assert not any("\n" in s or "\r" in s for s in lines)
    return lines


def load_corpus() -> list[str]:
    # Split on "\n" only: str.splitlines would also split on \x0b, \x1c, \x85, \u2028 ... that the corpus contains.
    return CORPUS_PATH.read_text(encoding="utf-8").split("\n")[:-1]


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return load_corpus()


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("clip_vocab")
    tok.save_pretrained_files(folder)
    return folder


@pytest.fixture(scope="module")
def reference(vocab_dir):
    """transformers' CLIPTokenizer built from the same vocabulary, as the spec says: vocab.json + merges.txt only."""
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"))


# ---------------------------------------------------------------------------------------------------------------------
# Tests

def test_corpus_file_is_the_generated_one(corpus):
    assert len(corpus) >= 1000
    assert corpus == build_corpus(), "tests/data/tokenizer_corpus.txt is stale: run python tests/test_tokenizer.py"


def test_shipped_vocabulary_is_openai_clip(tok):
    # The gzip is open_clip_torch 3.3.0's copy of OpenAI's bpe_simple_vocab_16e6.txt.gz.
    assert hashlib.sha256(DEFAULT_VOCAB.read_bytes()).hexdigest() == (
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a")
    assert len(tok.encoder) == 49408 and len(tok.bpe_ranks) == 48894
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == (49406, 49407, 49407, 77)
    # The ids every CLIP tutorial shows for this prompt.
    assert tok("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert CLIPTokenizer.default() is tok  # loaded once per process


def test_encode_matches_transformers(tok, reference, corpus):
    expected = reference(corpus, add_special_tokens=False)["input_ids"]
    mismatches = [(s, tok.encode(s), e) for s, e in zip(corpus, expected, strict=True) if tok.encode(s) != e]
    assert not mismatches, f"{len(mismatches)} of {len(corpus)} differ, first: {mismatches[0]}"


def test_sd_windows_match_transformers(tok, reference, corpus):
    # Exactly how SD 1.x pipelines call it: 77 tokens, BOS ... EOS, padded with <|endoftext|>.
    expected = reference(corpus, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = tok(corpus)
    assert got.dtype == torch.long and got.shape == (len(corpus), 77)
    assert torch.equal(got, expected)
    assert (got[:, -1] == tok.pad_token_id).any() and (got[:, -1] == tok.eos_token_id).any()  # both cases occur


def test_sd2_pad_matches_transformers(vocab_dir, corpus):
    # SD 2.x pads with "!" (id 0), which transformers then also treats as a special token inside prompts.
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), pad_token="!")
    tok = CLIPTokenizer.default(pad_token_id=0)
    assert tok.pad_token_id == 0 and CLIPTokenizer.default().pad_token_id == 49407
    expected = reference(corpus, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tok(corpus), expected)
    assert tok.encode("wow!")[-1] == 0 and CLIPTokenizer.default().encode("wow!")[-1] == 256


def test_longest_padding_and_no_truncation_match_transformers(tok, reference, corpus):
    batch = corpus[:40] + [s for s in corpus if len(s) > 600][:10]
    expected = reference(batch, padding="longest", truncation=False, return_tensors="pt").input_ids
    got = tok(batch, truncation=False, padding=False)
    assert got.shape[1] > 77 and torch.equal(got, expected)
    # With padding on, short batches still fill the whole window.
    assert tok(["a", "b c"], padding=False).shape == (2, 4) and tok(["a", "b c"]).shape == (2, 77)


def test_truncation_keeps_bos_first_and_eos_last(tok, corpus):
    long_prompt = max(corpus, key=lambda s: len(tok.encode(s)))
    ids = tok.encode(long_prompt)
    assert len(ids) > 200
    row = tok(long_prompt)[0]
    assert row.tolist() == [tok.bos_token_id, *ids[:75], tok.eos_token_id]
    assert tok(long_prompt, max_length=10)[0].tolist() == [tok.bos_token_id, *ids[:8], tok.eos_token_id]
    assert tok("", max_length=2)[0].tolist() == [tok.bos_token_id, tok.eos_token_id]


def test_decode_matches_transformers(tok, reference, corpus):
    # Rows cut at 77 tokens can end mid-UTF-8 character: both sides must emit the same U+FFFD replacements.
    rows = tok(corpus)
    for row in rows:
        ids = row.tolist()
        assert tok.decode(row) == reference.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    # Bytes of "€" split by a special token: skipping it rejoins them on both sides.
    euro = [tok.encoder[tok._byte_encoder[b]] for b in "€".encode()]
    split = [euro[0], tok.eos_token_id, *euro[1:]]
    assert tok.decode(split, skip_special_tokens=True) == reference.decode(split, skip_special_tokens=True) == "€"
    # Arbitrary id sequences: broken UTF-8 everywhere, special tokens anywhere.
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.choice([rng.randrange(49408), rng.randrange(256), 49406, 49407]) for _ in range(rng.randint(0, 12))]
        assert tok.decode(ids) == reference.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def test_decode_round_trip_on_ascii(tok, corpus):
    assert tok.decode(tok.encode("a photo of a cat")) == "a photo of a cat"
    ascii_lines = [s for s in corpus if s.isascii() and s.isprintable()]
    assert len(ascii_lines) > 300
    for s in ascii_lines:
        ids = tok.encode(s)
        # decode puts a space after every word ("a, b" -> "a , b"), which re-encodes to the same ids.
        assert tok.encode(tok.decode(ids)) == ids


def test_diffusers_folder_loading(tmp_path, tok, corpus):
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained_files(tmp_path / "sd15")
    loaded = CLIPTokenizer.from_pretrained_dir(tmp_path / "sd15")
    assert torch.equal(loaded(corpus), tok(corpus))
    assert loaded.pad_token_id == 49407 and loaded.model_max_length == 77
    from_files = CLIPTokenizer.from_files(tmp_path / "sd15" / "vocab.json", tmp_path / "sd15" / "merges.txt")
    assert torch.equal(from_files(corpus), tok(corpus))
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path / "sd15")
    assert torch.equal(reference(corpus, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids, loaded(corpus))

    # SD 2.x's folder: tokenizer_config.json says pad "<|endoftext|>" but special_tokens_map.json says "!", and wins.
    sd2 = tmp_path / "sd2"
    tok.save_pretrained_files(sd2)
    (sd2 / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                       "single_word": False},
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"}))
    loaded2 = CLIPTokenizer.from_pretrained_dir(sd2)
    reference2 = transformers.CLIPTokenizer.from_pretrained(sd2)
    assert loaded2.pad_token_id == reference2.pad_token_id == 0
    assert torch.equal(loaded2(corpus[:200]), reference2(corpus[:200], padding="max_length", max_length=77,
                                                         truncation=True, return_tensors="pt").input_ids)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="vocab.json is missing"):
        CLIPTokenizer.from_pretrained_dir(tmp_path / "empty")


def test_html_unescape_is_opt_in(tok):
    # Off (transformers' behaviour): entities are plain punctuation and letters.
    assert tok.encode("&amp;") == [261, 6259, 282]
    clip = CLIPTokenizer.default(html_unescape=True)
    # On (OpenAI CLIP's behaviour): unescaped twice, so "&amp;lt;3" is "<3".
    assert clip.encode("&amp;lt;3") == tok.encode("<3") and clip.encode("&amp;") == tok.encode("&")
    assert clip.encode("&eacute;t&eacute;") == tok.encode("été")


def test_bad_input_raises(tok):
    with pytest.raises(ValueError, match="max_length"):
        tok("a cat", max_length=1)
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(ValueError, match="str"):
        tok(["a cat", None])
    with pytest.raises(ValueError, match="pad_token_id"):
        CLIPTokenizer.default(pad_token_id=10**6)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([49408])


if __name__ == "__main__":
    CORPUS_PATH.parent.mkdir(parents=True, exist_ok=True)
    CORPUS_PATH.write_text("".join(s + "\n" for s in build_corpus()), encoding="utf-8")
    print(f"wrote {len(build_corpus())} lines to {CORPUS_PATH}")
