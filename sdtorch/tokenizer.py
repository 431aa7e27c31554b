"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), giving the same ids as transformers' CLIPTokenizer.

Text goes through four steps:
  1. split out special tokens, matched exactly in the raw text (as transformers' added tokens are);
  2. normalize each remaining piece: NFC, then lowercase (optionally HTML-unescape first, as OpenAI's CLIP does);
  3. pre-tokenize with CLIP's regex into words (letter runs, single digits, punctuation runs, contractions);
     a special token's text that was not typed exactly (e.g. "<|ENDOFTEXT|>") becomes ordinary words;
  4. map each word's UTF-8 bytes to printable characters and merge them with byte-pair encoding
     (Sennrich et al. 2016), the last symbol carrying the end-of-word marker "</w>".
"""

import html
import itertools
import json
import unicodedata
import zlib
from functools import lru_cache, cache
from pathlib import Path

import regex
import torch

DEFAULT_VOCAB = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's vocabulary is 256 bytes + 256 end-of-word bytes + these merges + 2 special tokens = 49408 tokens.
CLIP_NUM_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenizer pattern: words are special-token lookalikes, contractions, letter runs, single digits or
# punctuation runs. No IGNORECASE (OpenAI's CLIP has it): the text is already lowercased, and case-folding would make
# "'ſ" a contraction. `regex`'s \s is Unicode White_Space, the same set as the Oniguruma \s transformers uses (Python's
# str.split is not: it also splits on \x1c-\x1f). Whitespace never matches, so CLIP's whitespace collapse is implicit.
WORD_PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character (GPT-2's table): printable Latin-1 bytes stay, the rest move to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return table  # insertion order (printable bytes, then moved ones) is the order of CLIP's first 256 tokens


def _lowercase(text: str) -> str:
    # transformers lowercases character by character; Python's str.lower applies the one context rule it knows
    # (a final capital sigma becomes "ς"). Turning every "Σ" into "σ" first makes the two agree.
    return text.replace("Σ", "σ").lower()


class CLIPTokenizer:
    """Byte-level BPE tokenizer for CLIP text encoders: `tok(prompts)` gives the (B, 77) ids SD feeds its text model."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token_id: int | None = None,
                 model_max_length: int = 77, html_unescape: bool = False):
        for token in (BOS_TOKEN, EOS_TOKEN):
            if token not in vocab:
                raise ValueError(f"vocabulary has no {token!r}")
        self.encoder = vocab
        self.decoder = {i: t for t, i in vocab.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_token_id = vocab[BOS_TOKEN]
        self.eos_token_id = vocab[EOS_TOKEN]
        self.pad_token_id = self.eos_token_id if pad_token_id is None else pad_token_id
        if self.pad_token_id not in self.decoder:
            raise ValueError(f"pad_token_id {self.pad_token_id} is not in the vocabulary of {len(vocab)} tokens")
        self.model_max_length = model_max_length
        # OpenAI's CLIP unescapes HTML twice ("&amp;lt;" -> "<"); transformers, and so every SD pipeline, does not.
        self.html_unescape = html_unescape
        # The pad token is a special token too: SD 2.x pads with "!" (id 0), and transformers then encodes a "!" typed
        # in a prompt as id 0 rather than BPE's "!</w>" (256). We match it.
        self.special_ids = {self.decoder[i]: i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id)}
        specials = sorted(self.special_ids, key=len, reverse=True)  # longest first, so a special never splits another
        self._special_pattern = regex.compile("(" + "|".join(regex.escape(t) for t in specials) + ")")
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        # Prompts repeat words constantly: caching a word's ids skips the merge loop nearly always.
        self._word_ids = lru_cache(maxsize=1 << 16)(self._word_ids_uncached)

    @classmethod
    def default(cls, pad_token_id: int | None = None, html_unescape: bool = False) -> "CLIPTokenizer":
        """The tokenizer over the shipped OpenAI CLIP vocabulary (49,408 tokens), loaded once per process."""
        return _default_tokenizer(pad_token_id, html_unescape)

    @classmethod
    def from_bpe_gz(cls, path: str | Path = DEFAULT_VOCAB, pad_token_id: int | None = None,
                    html_unescape: bool = False) -> "CLIPTokenizer":
        """Build from CLIP's merge list (bpe_simple_vocab_16e6.txt.gz), constructing the vocabulary as CLIP does."""
        merges = [tuple(line.split()) for line in _gzip_lines(path, 1 + CLIP_NUM_MERGES)[1:]]  # 0: a version header
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
        vocab = {t: i for i, t in enumerate(tokens)}
        return cls(vocab, merges, pad_token_id=pad_token_id, html_unescape=html_unescape)

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, pad_token_id: int | None = None,
                   html_unescape: bool = False) -> "CLIPTokenizer":
        """Build from a Hugging Face vocab.json (token -> id) and merges.txt (one "a b" merge per line, by rank)."""
        vocab, merges = _read_vocab_merges(Path(vocab_json), Path(merges_txt))
        return cls(vocab, merges, pad_token_id=pad_token_id, html_unescape=html_unescape)

    @classmethod
    def from_pretrained_dir(cls, folder: str | Path) -> "CLIPTokenizer":
        """Load a diffusers `tokenizer/` folder; pad token and max length come from its JSON configs."""
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise ValueError(f"{folder} is not a tokenizer folder: {name} is missing")
        vocab, merges = _read_vocab_merges(folder / "vocab.json", folder / "merges.txt")
        config = _read_json(folder / "tokenizer_config.json")
        pad_token = config.get("pad_token")
        # transformers lets special_tokens_map.json override the config, unless the config is of the newer kind that
        # lists its added tokens (then the map is not read). SD 2.x relies on this: its map says pad "!".
        if "added_tokens_decoder" not in config:
            pad_token = _read_json(folder / "special_tokens_map.json").get("pad_token", pad_token)
        if isinstance(pad_token, dict):
            pad_token = pad_token["content"]
        if pad_token is not None and pad_token not in vocab:
            raise ValueError(f"{folder}: pad token {pad_token!r} is not in vocab.json")
        pad_token_id = None if pad_token is None else vocab[pad_token]
        return cls(vocab, merges, pad_token_id=pad_token_id, model_max_length=config.get("model_max_length", 77))

    def with_pad_token_id(self, pad_token_id: int | None) -> "CLIPTokenizer":
        """The same tokenizer padding with another id (SDXL's second tower pads with 0, its first with EOS)."""
        merges = sorted(self.bpe_ranks, key=self.bpe_ranks.get)
        return CLIPTokenizer(self.encoder, merges, pad_token_id, self.model_max_length, self.html_unescape)

    def save_pretrained_files(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt and the two small JSON configs of a diffusers tokenizer folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        merges = "\n".join(" ".join(pair) for pair in self.bpe_ranks)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
        special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                   "pad_token": self.decoder[self.pad_token_id]}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length, **special}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        # Special tokens typed exactly were split out before; a lookalike left here (e.g. a lowercased "<|ENDOFTEXT|>")
        # is kept whole by the pattern only for transformers' byte-level step to split it GPT-2's way: "<|", name, "|>".
        if word in (BOS_TOKEN, EOS_TOKEN):
            return self._bpe_ids("<|") + self._bpe_ids(word[2:-2]) + self._bpe_ids("|>")
        return self._bpe_ids(word)

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        """Byte-pair-encode one pre-tokenized word: merge the lowest-ranked adjacent pair until none is known."""
        symbols = [self._byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        while len(symbols) > 1:
            pair = min(itertools.pairwise(symbols), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if pair not in self.bpe_ranks:
                break
            first, second = pair
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.encoder[s] for s in symbols)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without BOS/EOS and without truncation."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if self.html_unescape:
            text = html.unescape(html.unescape(text))
        ids = []
        # With one capture group, split() alternates ordinary text (even indices) and special tokens (odd indices).
        for k, piece in enumerate(self._special_pattern.split(text)):
            if k % 2:
                ids.append(self.special_ids[piece])
                continue
            piece = _lowercase(unicodedata.normalize("NFC", piece))
            for word in WORD_PATTERN.findall(piece):
                ids.extend(self._word_ids(word))
        return ids

    def __call__(self, texts: str | list[str], max_length: int | None = None, truncation: bool = True,
                 padding: bool = True) -> torch.Tensor:
        """Token windows as SD feeds CLIP: each row BOS + ids[:max_length-2] + EOS, then pad ids; (B, max_length) long.

        `max_length` defaults to `model_max_length` (77). Without truncation a longer row keeps all its ids and the
        batch is padded to it; without padding the batch is padded only to its longest row (a tensor is rectangular).
        """
        max_length = self.model_max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for BOS and EOS), got {max_length}")
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("texts is empty: give a prompt or a non-empty list of prompts")
        rows = []
        for text in texts:
            ids = self.encode(text)
            if truncation:
                ids = ids[:max_length - 2]
            rows.append([self.bos_token_id, *ids, self.eos_token_id])
        width = max(len(row) for row in rows)
        if padding:
            width = max(width, max_length)
        padded = [row + [self.pad_token_id] * (width - len(row)) for row in rows]
        return torch.tensor(padded, dtype=torch.long)  # (B, width)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or 1-D tensor): bytes back to UTF-8 (bad bytes become U+FFFD), "</w>" to a space."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one row of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        unknown = [i for i in ids if i not in self.decoder]
        if unknown:
            raise ValueError(f"ids not in the vocabulary of {len(self.decoder)} tokens: {unknown[:5]}")
        if skip_special_tokens:
            special = set(self.special_ids.values())
            ids = [i for i in ids if i not in special]
        # Special tokens are printable ASCII, which the byte table maps to itself, so they decode like any token.
        symbols = "".join(self.decoder[i] for i in ids)
        text = bytes(self._byte_decoder[c] for c in symbols).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()


def _read_vocab_merges(vocab_json: Path, merges_txt: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
    lines = merges_txt.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{merges_txt}: merges must be two symbols per line, got {' '.join(bad[0])!r}")
    return vocab, merges


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _gzip_lines(path: str | Path, count: int) -> list[str]:
    """The first `count` lines of a gzipped UTF-8 text, decompressing only as much as they take: CLIP uses 48,894 of
    its merge list's 262,145 lines, and reading the whole list was half of the tokenizer's start-up (~40 of ~95 ms)."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    parts, newlines = [], 0
    with open(path, "rb") as f:
        while newlines < count and (chunk := f.read(1 << 16)):
            parts.append(inflate.decompress(chunk))
            newlines += parts[-1].count(b"\n")
    data = b"".join(parts)
    if newlines >= count:  # cut after a newline: a chunk may end inside a multi-byte character
        data = data[:data.rindex(b"\n")]
    lines = data.decode("utf-8").split("\n", count)[:count]
    if len(lines) < count:
        raise ValueError(f"{path}: {len(lines)} lines, expected at least {count}")
    return lines


@cache
def _default_tokenizer(pad_token_id: int | None, html_unescape: bool) -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_gz(DEFAULT_VOCAB, pad_token_id=pad_token_id, html_unescape=html_unescape)
