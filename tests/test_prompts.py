"""A1111 prompt syntax: the emphasis parser, 75-token chunking, and emphasis applied to text-encoder outputs.

Expected values come from A1111's own docstrings (modules/prompt_parser.py) and from tracing its tokenize_line
(modules/sd_hijack_clip.py) by hand. The tokenizer and text encoder are small fakes with the real interfaces.
"""
import re

import pytest
import torch
from torch import nn

from sdtorch.prompts import encode_prompt, encode_prompt_pair, parse_prompt_attention, tokenize_prompt

BOS, EOS = 998, 999


class WordTokenizer:
    """One id per word or punctuation mark, assigned on first sight; the interface of sdtorch's CLIP tokenizer."""

    model_max_length = 77
    bos_token_id = BOS
    eos_token_id = EOS

    def __init__(self, pad_token_id=EOS):
        self.pad_token_id = pad_token_id  # SD 1.x pads with EOS; SD 2.x pads with a different id
        self.vocab = {",": 1}

    def encode(self, text):
        return [self.vocab.setdefault(word, len(self.vocab) + 1) for word in re.findall(r"\w+|[^\w\s]", text)]


class ToyTextEncoder(nn.Module):
    """(B, 77) ids -> (B, 77, D). A causal running mean makes each position depend on the ones before it,
    so an encoding is only right if the whole chunk was framed right. clip_skip picks the layer, as CLIP's does."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Embedding(1000, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))

    def forward(self, input_ids, clip_skip=1):
        h = self.embed(input_ids)  # (B, 77) -> (B, 77, D)
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1)[:, None]
        hidden = [h]
        for layer in self.layers:
            hidden.append(torch.tanh(layer(hidden[-1])) + 0.5)  # + 0.5 keeps the mean far from 0
        return hidden[-clip_skip]


@pytest.fixture
def tok():
    return WordTokenizer()


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return ToyTextEncoder()


def words(n, start=0):
    return " ".join(f"w{i}" for i in range(start, start + n))


# --- parse_prompt_attention ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # A1111's docstring examples, floats exactly as A1111 prints them.
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    # More cases, traced through A1111's algorithm.
    ("", [["", 1.0]]),
    ("((word))", [["word", 1.2100000000000002]]),
    ("(word:1.3)", [["word", 1.3]]),
    ("(word:.5) (x:2.)", [["word", 0.5], [" ", 1.0], ["x", 2.0]]),
    ("(word:-1)", [["word", -1.0]]),
    ("[word]", [["word", 1 / 1.1]]),
    ("[[word]]", [["word", (1 / 1.1) * (1 / 1.1)]]),
    ("[unbalanced", [["unbalanced", 1 / 1.1]]),
    ("([a", [["a", 1.1 * (1 / 1.1)]]),  # unclosed: round brackets apply first, then square...
    ("[((c:2.1)", [["c", 2.1000000000000005]]),  # ...as the last bit shows (square first gives 2.1)
    ("a) b] c:1.2)", [["a) b] c:1.2)", 1.0]]),  # closers with nothing open are text
    ("(a:1.2", [["a:1.2", 1.1]]),  # a weight needs its ')' to count
    # A1111 allows whitespace on both sides of the number (its regex ':\s*([+-]?[.\d]+)\s*\)')
    ("(a: 1.5)", [["a", 1.5]]),
    ("(a:1.5 )", [["a", 1.5]]),
    ("(a :\t1.5\n) b", [["a ", 1.5], [" b", 1.0]]),
    ("(a: b)", [["a: b", 1.1]]),  # no number: the colon is text
    ("(a:1.2.3)", [["a:1.2.3", 1.1]]),  # not a number: A1111 raises here; we read it as text
    ("\\\\ and \\[x\\)", [["\\ and [x)", 1.0]]),
    ("a\\b", [["ab", 1.0]]),  # a backslash before anything else is dropped
    ("(a)\\", [["a", 1.1], ["", 1.0]]),  # ...leaving an empty run that merging keeps
    ("a BREAK b", [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]),
    ("a\nBREAK\n(b)", [["a", 1.0], ["BREAK", -1.0], ["", 1.0], ["b", 1.1]]),
    ("BREAKFAST BREAK", [["BREAKFAST", 1.0], ["BREAK", -1.0], ["", 1.0]]),
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]),  # A1111 scales the marker too
])
def test_parse_prompt_attention_matches_a1111(text, expected):
    assert parse_prompt_attention(text) == expected  # exact: same multiplications in the same order


def test_parse_prompt_attention_rejects_non_strings():
    with pytest.raises(ValueError):
        parse_prompt_attention(None)


# --- tokenize_prompt -------------------------------------------------------------------------------------------

def test_chunk_of_exactly_75_tokens_has_no_padding(tok):
    [chunk] = tokenize_prompt(tok, words(75))
    assert chunk.tokens == [BOS] + tok.encode(words(75)) + [EOS]
    assert chunk.multipliers == [1.0] * 77


def test_76_tokens_spill_one_token_into_a_second_chunk(tok):
    ids = tok.encode(words(76))
    first, second = tokenize_prompt(tok, words(76))
    assert first.tokens == [BOS] + ids[:75] + [EOS]
    assert second.tokens == [BOS, ids[75], EOS] + [EOS] * 74


def test_150_tokens_fill_two_chunks_and_151_need_three(tok):
    ids = tok.encode(words(151))
    chunks = tokenize_prompt(tok, words(150))
    assert [c.tokens for c in chunks] == [[BOS] + ids[:75] + [EOS], [BOS] + ids[75:150] + [EOS]]
    assert len(tokenize_prompt(tok, words(151))) == 3


def test_empty_prompt_is_one_chunk_of_padding(tok):
    [chunk] = tokenize_prompt(tok, "")
    assert chunk.tokens == [BOS, EOS] + [EOS] * 75
    assert chunk.multipliers == [1.0] * 77


def test_padding_uses_the_pad_id_after_eos():
    tok = WordTokenizer(pad_token_id=0)  # SD 2.x style
    [chunk] = tokenize_prompt(tok, "a b")
    assert chunk.tokens == [BOS, 2, 3, EOS] + [0] * 73


@pytest.mark.parametrize("comma_at, backtracks", [(60, True), (55, True), (54, False), (50, False)])
def test_full_chunk_breaks_after_a_comma_within_20_tokens(tok, comma_at, backtracks):
    # comma_at words, a comma, then words up to 81 tokens: the chunk fills at token 75 while the comma sits
    # 75 - comma_at tokens back; A1111 moves the words after it to the next chunk when that is <= 20.
    prompt = f"{words(comma_at)} , {words(80 - comma_at, start=comma_at)}"
    ids = tok.encode(prompt)
    first, second = tokenize_prompt(tok, prompt)
    cut = comma_at + 1 if backtracks else 75
    assert first.tokens == [BOS] + ids[:cut] + [EOS] + [EOS] * (75 - cut)
    assert second.tokens == [BOS] + ids[cut:] + [EOS] + [EOS] * (75 - len(ids[cut:]))


def test_comma_backtrack_carries_multipliers_and_can_be_disabled(tok):
    prompt = f"{words(70)}, ({words(10, start=70)})"
    first, second = tokenize_prompt(tok, prompt)
    assert first.multipliers == [1.0] * 77  # 70 words and the comma; the emphasised words moved on
    assert second.multipliers == [1.0] + [1.1] * 10 + [1.0] * 66
    first, second = tokenize_prompt(tok, prompt, comma_padding_backtrack=0)
    assert first.multipliers == [1.0] * 72 + [1.1] * 4 + [1.0]


def test_comma_as_token_76_starts_the_next_chunk(tok):
    ids = tok.encode(f"{words(75)}, x")
    first, second = tokenize_prompt(tok, f"{words(75)}, x")
    assert first.tokens == [BOS] + ids[:75] + [EOS]
    assert second.tokens[:4] == [BOS, 1, ids[76], EOS]


def test_break_forces_a_new_chunk(tok):
    chunks = tokenize_prompt(tok, "a b BREAK c")
    assert [c.tokens[:4] for c in chunks] == [[BOS, 2, 3, EOS], [BOS, 4, EOS, EOS]]
    # BREAK at the start or twice in a row closes an empty chunk, as in A1111.
    assert len(tokenize_prompt(tok, "BREAK a")) == 2
    assert len(tokenize_prompt(tok, "a BREAK BREAK b")) == 3


def test_multipliers_follow_emphasis(tok):
    [chunk] = tokenize_prompt(tok, "a (b c) [d] (e:1.5)")
    assert chunk.tokens[:7] == [BOS, 2, 3, 4, 5, 6, EOS]
    assert chunk.multipliers[:7] == [1.0, 1.0, 1.1, 1.1, 1 / 1.1, 1.5, 1.0]
    assert len(chunk.tokens) == len(chunk.multipliers) == 77


# --- encode_prompt ---------------------------------------------------------------------------------------------

def emphasised(encoder, ids, multipliers):
    """A1111's "Original" emphasis for one chunk, written out: scale tokens, then restore the chunk's mean."""
    z = encoder(torch.tensor([ids]))
    original_mean = z.mean()
    z = z * torch.tensor([multipliers])[..., None]
    return z * (original_mean / z.mean())


def test_emphasis_scales_tokens_and_restores_the_mean(tok, encoder):
    z = encode_prompt(encoder, tok, "a (b:1.5) [c]")
    ids = [BOS] + tok.encode("a b c") + [EOS] * 73
    raw = encoder(torch.tensor([ids]))
    torch.testing.assert_close(z, emphasised(encoder, ids, [1.0, 1.0, 1.5, 1 / 1.1] + [1.0] * 73), rtol=0, atol=0)
    torch.testing.assert_close(z.mean(), raw.mean(), rtol=1e-6, atol=0)
    # After the common rescale, token b is still 1.5 / (1 / 1.1) times as strong as token c, relative to raw.
    ratio_b, ratio_c = z[0, 2] / raw[0, 2], z[0, 3] / raw[0, 3]
    torch.testing.assert_close(ratio_b / ratio_c, torch.full_like(ratio_b, 1.5 * 1.1), rtol=1e-5, atol=0)


def test_without_emphasis_the_encoding_is_the_raw_encoder_output(tok, encoder):
    ids = [BOS] + tok.encode("a photo, of a cat") + [EOS] * 70
    torch.testing.assert_close(encode_prompt(encoder, tok, "a photo, of a cat"), encoder(torch.tensor([ids])),
                               rtol=0, atol=0)


def test_long_prompt_is_the_concatenation_of_chunks_encoded_alone(tok, encoder):
    prompt = f"({words(40)}), {words(60, start=40)} [{words(50, start=100)}]"
    ids = tok.encode(f"{words(40)}, {words(60, start=40)} {words(50, start=100)}")  # the same text, no brackets
    # 151 tokens; the comma is token 40, too far back to move the first chunk break
    mults = [1.1] * 40 + [1.0] * 61 + [1 / 1.1] * 50
    assert len(ids) == 151 and ids[40] == 1
    expected = torch.cat([
        emphasised(encoder, [BOS] + ids[:75] + [EOS], [1.0] + mults[:75] + [1.0]),
        emphasised(encoder, [BOS] + ids[75:150] + [EOS], [1.0] + mults[75:150] + [1.0]),
        emphasised(encoder, [BOS] + ids[150:] + [EOS] * 75, [1.0] + mults[150:] + [1.0] * 75),
    ], dim=1)
    z = encode_prompt(encoder, tok, prompt)
    assert z.shape == (1, 231, 16)
    # Chunks are encoded as one batch here and one at a time above: equal up to float rounding.
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)


def test_clip_skip_reaches_the_encoder(tok, encoder):
    ids = torch.tensor([[BOS] + tok.encode("a cat") + [EOS] * 74])
    torch.testing.assert_close(encode_prompt(encoder, tok, "a cat", clip_skip=2), encoder(ids, clip_skip=2),
                               rtol=0, atol=0)
    with pytest.raises(ValueError):
        encode_prompt(encoder, tok, "a cat", clip_skip=0)


def test_min_chunks_pads_with_the_empty_prompt(tok, encoder):
    z = encode_prompt(encoder, tok, "a cat", min_chunks=3)
    empty = encode_prompt(encoder, tok, "")
    assert z.shape == (1, 231, 16)
    torch.testing.assert_close(z[:, :77], encode_prompt(encoder, tok, "a cat"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z[:, 77:154], empty, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z[:, 154:], empty, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        encode_prompt(encoder, tok, "a cat", min_chunks=0)


@pytest.mark.parametrize("prompt_words, negative_words", [(100, 0), (3, 160), (80, 90)])
def test_pair_pads_the_shorter_prompt_to_the_same_chunk_count(tok, encoder, prompt_words, negative_words):
    prompt, negative = words(prompt_words), words(negative_words, start=500)
    k = max(len(tokenize_prompt(tok, prompt)), len(tokenize_prompt(tok, negative)))
    cond, uncond = encode_prompt_pair(encoder, tok, prompt, negative)
    assert cond.shape == uncond.shape == (1, 77 * k, 16)
    torch.testing.assert_close(cond, encode_prompt(encoder, tok, prompt, min_chunks=k), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(uncond, encode_prompt(encoder, tok, negative, min_chunks=k), rtol=1e-6, atol=1e-6)


def test_empty_negative_prompt_is_encoded_not_zeros(tok, encoder):
    _, uncond = encode_prompt_pair(encoder, tok, "a cat", "")
    ids = torch.tensor([[BOS, EOS] + [EOS] * 75])
    torch.testing.assert_close(uncond, encoder(ids), rtol=1e-6, atol=1e-6)
