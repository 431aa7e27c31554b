"""Prompts as A1111's web UI reads them: (emphasis:1.2), [de-emphasis], BREAK, and prompts longer than 75 tokens.

CLIP sees at most 77 tokens. A1111 splits a long prompt into 75-token chunks, frames each as BOS + 75 + EOS, encodes
the chunks separately and concatenates them along the sequence axis; cross-attention in the UNet does not care how
long the context is. Emphasis scales each token's output vector, then rescales the chunk to keep its mean.
The text encoder and tokenizer are used only through their interfaces:
    text_encoder(input_ids (B, 77), clip_skip=1) -> (B, 77, D)
    tokenizer.encode(text) -> list[int] (no BOS/EOS); bos_token_id, eos_token_id, pad_token_id, model_max_length
"""
import re
from dataclasses import dataclass, field

import torch

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# One match per syntactic unit, tried in this order.
_ATTENTION_TOKEN = re.compile(r"""
    \\(?P<escaped>[()\[\]\\])?                      # \( \) \[ \] \\ are literals; a lone backslash is dropped
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)  # ':1.3)' closes a round bracket with a weight; A1111 allows
                                                    # spaces around the number: ': 1.3 )'
  | (?P<close>[)\]])
  | [^\\()\[\]:]+                                   # plain text
  | :                                               # a colon that is not part of a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """Split a prompt into [text, weight] runs with A1111's emphasis grammar (modules/prompt_parser.py).

    (a) multiplies by 1.1, [a] divides by 1.1, (a:w) multiplies by w; brackets nest multiplicatively and unclosed
    ones apply to the end of the prompt. BREAK yields the marker ["BREAK", -1.0]. Adjacent runs of equal weight are
    merged. Results equal A1111's float for float, because ranges are multiplied in the same order.
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a str, got {type(text).__name__}")
    runs = []
    open_round, open_square = [], []  # indices into runs where each still-open bracket began

    def scale_from(start, factor):
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token = match.group(0)
        if token.startswith("\\"):
            # A1111 appends the (possibly empty) literal as its own run; the empty run can survive merging.
            runs.append([match.group("escaped") or "", 1.0])
        elif match.group("open") == "(":
            open_round.append(len(runs))
        elif match.group("open") == "[":
            open_square.append(len(runs))
        elif match.group("weight") is not None and open_round:
            scale_from(open_round.pop(), float(match.group("weight")))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:  # plain text, or a bracket/weight with nothing open to close
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    runs.append(["BREAK", -1.0])  # a marker: -1 is never a real weight
                runs.append([part, 1.0])

    # Unclosed brackets reach to the end of the prompt: all round ones first, then square, as A1111 does.
    # (A BREAK inside brackets gets scaled too and then reads as the word "BREAK"; A1111 does the same.)
    for start in open_round:
        scale_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_MULTIPLIER)

    if not runs:
        return [["", 1.0]]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return merged


@dataclass
class PromptChunk:
    """One CLIP window: BOS, up to 75 prompt tokens, EOS, padding (77 ids), and one emphasis multiplier per id."""
    tokens: list[int]
    multipliers: list[float]
    fixes: list = field(default_factory=list)  # (offset after BOS, (n, D) vectors): textual-inversion embeddings


def _frame_chunk(tokenizer, tokens, weights, fixes=()):
    """BOS + tokens + EOS + padding to model_max_length; BOS, EOS and padding carry multiplier 1.0.

    A1111 pads with EOS, then overwrites everything after the first EOS with the pad id; the result is the same.
    """
    padding = tokenizer.model_max_length - 2 - len(tokens)
    return PromptChunk(
        tokens=[tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding,
        multipliers=[1.0, *weights, 1.0] + [1.0] * padding,
        fixes=list(fixes),
    )


def tokenize_prompt(tokenizer, prompt: str, comma_padding_backtrack: int = 20, embeddings=None) -> list[PromptChunk]:
    """Split a prompt into 75-token chunks as A1111 does (modules/sd_hijack_clip.py, tokenize_line).

    A chunk that fills up while a comma lies within its last `comma_padding_backtrack` tokens is cut just after
    that comma, so the phrase being written moves whole into the next chunk. BREAK starts a new chunk.
    An empty prompt gives one chunk of padding. `embeddings` (an embeddings.EmbeddingMatcher) finds embedding names
    among the tokens: each takes as many places as it has vectors, all in one chunk (A1111's PromptChunkFix).
    """
    if comma_padding_backtrack < 0:
        raise ValueError(f"comma_padding_backtrack must be >= 0, got {comma_padding_backtrack}")
    chunk_length = tokenizer.model_max_length - 2  # room left after BOS and EOS: 75 for CLIP
    comma = tokenizer.encode(",")[0]
    chunks = []
    tokens, weights, fixes = [], [], []  # the chunk being filled, without BOS/EOS
    last_comma = -1  # position of the last comma in the chunk being filled

    def close_chunk():
        nonlocal tokens, weights, fixes, last_comma
        chunks.append(_frame_chunk(tokenizer, tokens, weights, fixes))
        tokens, weights, fixes, last_comma = [], [], [], -1

    for text, weight in parse_prompt_attention(prompt):
        if text == "BREAK" and weight == -1:
            close_chunk()
            continue
        ids = tokenizer.encode(text)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(tokens)
            elif (comma_padding_backtrack and len(tokens) == chunk_length and last_comma != -1
                  and len(tokens) - last_comma <= comma_padding_backtrack):
                # The chunk is full mid-phrase: end it after the comma and carry the phrase over whole.
                cut = last_comma + 1
                carried = tokens[cut:], weights[cut:], [(offset - cut, v) for offset, v in fixes if offset >= cut]
                tokens, weights, fixes = tokens[:cut], weights[:cut], [fix for fix in fixes if fix[0] < cut]
                close_chunk()
                tokens, weights, fixes = carried
            if len(tokens) == chunk_length:
                close_chunk()
            found = embeddings.match(ids, position) if embeddings is not None else None
            if found is None:
                tokens.append(token)
                weights.append(weight)
                position += 1
                continue
            embedding, name_length = found
            vectors = embedding.vectors
            if len(tokens) + len(vectors) > chunk_length:
                close_chunk()
            fixes.append((len(tokens), vectors))
            tokens += [0] * len(vectors)  # placeholders whose token vectors the embedding replaces
            weights += [weight] * len(vectors)
            position += name_length
    if tokens or not chunks:
        close_chunk()
    return chunks


def _encode_chunks(text_encoder, chunks, clip_skip):
    """Encode chunks as one batch and apply A1111's "Original" emphasis to each: (k, 77, D)."""
    if not isinstance(clip_skip, int) or clip_skip < 1:
        raise ValueError(f"clip_skip must be an int >= 1 (1 = last layer), got {clip_skip!r}")
    device = next(text_encoder.parameters()).device
    ids = torch.tensor([chunk.tokens for chunk in chunks], dtype=torch.long, device=device)  # (k, 77)
    if any(chunk.fixes for chunk in chunks):  # embeddings' vectors replace their placeholders' token vectors
        token_embeds = text_encoder.embeddings.token_embedding(ids)  # (k, 77) -> (k, 77, D)
        for row, chunk in enumerate(chunks):
            for offset, vectors in chunk.fixes:
                token_embeds[row, 1 + offset:1 + offset + len(vectors)] = vectors.to(token_embeds)
        z = text_encoder(ids, clip_skip=clip_skip, token_embeds=token_embeds)
    else:
        z = text_encoder(ids, clip_skip=clip_skip)  # (k, 77) -> (k, 77, D)
    multipliers = torch.tensor([chunk.multipliers for chunk in chunks], dtype=z.dtype, device=z.device)  # (k, 77)
    # Scaling token vectors shifts the chunk's overall mean, which shows up as artifacts; A1111 scales the whole
    # chunk back to its original mean. Each chunk is normalised on its own, as A1111 encodes them one at a time.
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * multipliers[..., None]
    return z * (original_mean / z.mean(dim=(1, 2), keepdim=True))


def encode_prompt(text_encoder, tokenizer, prompt: str, clip_skip: int = 1, min_chunks: int = 1) -> torch.Tensor:
    """Encode a prompt with A1111's chunking and emphasis: (1, 77·k, D), k = max(chunks needed, min_chunks)."""
    if min_chunks < 1:
        raise ValueError(f"min_chunks must be >= 1, got {min_chunks}")
    chunks = tokenize_prompt(tokenizer, prompt)
    chunks += tokenize_prompt(tokenizer, "") * (min_chunks - len(chunks))
    z = _encode_chunks(text_encoder, chunks, clip_skip)
    return z.reshape(1, -1, z.shape[-1])  # (k, 77, D) -> (1, 77·k, D)


def encode_prompt_pair(text_encoder, tokenizer, prompt: str, negative_prompt: str = "",
                       clip_skip: int = 1, embeddings=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode (prompt, negative prompt) for classifier-free guidance: two (1, 77·k, D) tensors of equal length.

    The shorter one is padded with chunks of the empty prompt, as A1111 does, so both can share a batch.
    `embeddings`: an embeddings.EmbeddingMatcher, for textual-inversion names in either prompt.
    """
    cond = tokenize_prompt(tokenizer, prompt, embeddings=embeddings)
    uncond = tokenize_prompt(tokenizer, negative_prompt, embeddings=embeddings)
    k = max(len(cond), len(uncond))
    empty = tokenize_prompt(tokenizer, "")
    cond, uncond = cond + empty * (k - len(cond)), uncond + empty * (k - len(uncond))
    z = _encode_chunks(text_encoder, cond + uncond, clip_skip)  # (2k, 77, D), one encoder call for both
    return z[:k].reshape(1, -1, z.shape[-1]), z[k:].reshape(1, -1, z.shape[-1])  # 2 × (1, 77·k, D)


# A1111's extra-network tags (modules/extra_networks.py): "<lora:NAME:TE:UNET>", removed from the text before encoding
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")  # "lyco": the LyCORIS extension's tag, which A1111's Lora extension also reads


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """(prompt without its LoRA tags, [(name, unet multiplier, te multiplier)]), read as A1111's Lora extension
    (extra_networks_lora.py) reads them: <lora:NAME> is 1 for both; <lora:NAME:TE:UNET> is the text encoder's, then
    the UNet's multiplier; te=/unet= override either. The UNet's defaults to the text encoder's final value, so
    <lora:NAME:0.8> is 0.8 for both and <lora:NAME:1:te=0.5> is 0.5 for both, exactly as A1111 reads them."""
    found = []

    def take(match: re.Match) -> str:
        if match[1] not in LORA_KINDS:
            return match[0]
        items = match[2].split(":")
        positional = [item for item in items if "=" not in item]
        named = dict(item.split("=", 1) for item in items if "=" in item)
        if not positional or not positional[0]:
            raise ValueError(f"{match[0]}: a LoRA tag needs a name")
        try:
            te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
            unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        except ValueError:
            raise ValueError(f"{match[0]}: multipliers must be numbers") from None
        found.append((positional[0], unet, te))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found
