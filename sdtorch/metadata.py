"""The A1111 "parameters" text that PNGs from the AUTOMATIC1111 web UI carry, and that many tools read back:

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512

Layout and quoting follow A1111's processing.create_infotext and infotext_utils.parse_generation_parameters.
"""
import io
import json
import re
from os import PathLike

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PNG_TEXT_KEY = "parameters"

# A1111's regex for one "Key: value" field: a value is either a JSON string or runs to the next comma.
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]*[\w\-/]")  # what _FIELD reads back as a key, without trailing spaces
_SIZE = re.compile(r"(\d+)x(\d+)")
_CROP = re.compile(r"(\d+),\s*(\d+)")
_NEGATIVE_PREFIX = "Negative prompt:"
# A1111 infotext key -> (our keyword argument, its type); "Size" is split into width and height separately.
_KWARG_NAMES = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule", str),
    "CFG scale": ("cfg", float),
    "Seed": ("seed", int),
    "Clip skip": ("clip_skip", int),
    "Denoising strength": ("strength", float),
    "Model hash": ("model_hash", str),
    "Model": ("model", str),
    "RNG": ("rng", str),
    "Hires upscale": ("hires_scale", float),
    "Hires steps": ("hires_steps", int),
    "Hires upscaler": ("hires_upscaler", str),
    "NGMS": ("ngms", float),
    "NGMS all steps": ("ngms_all_steps", lambda v: v == "True"),
    "Token merging ratio": ("token_merging_ratio", float),
    "Token merging ratio hr": ("token_merging_ratio_hr", float),
    "DeepCache interval": ("deep_cache_interval", int),  # sdtorch's: A1111 has no DeepCache of its own
    "DeepCache depth": ("deep_cache_depth", int),
    "Refiner": ("refiner_title", str),  # "name [hash]": which model, not where it is (the CLI asks for its path)
    "Refiner switch at": ("refiner_switch_at", float),
}


def _format_value(value) -> str:
    """str(value), but integral floats print as integers ("CFG scale: 7", as A1111's UI writes it)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quote(text: str) -> str:
    """Quote a value as a JSON string when it could not be read back bare (A1111's infotext_utils.quote).

    A1111 quotes on ',', ':' and newlines; we also quote on '"' and on leading/trailing whitespace, which A1111
    would otherwise lose or misread. A1111 reads either form back the same way.
    """
    if any(c in text for c in ',:\n"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    """Inverse of _quote; text that is not a valid JSON string is returned unchanged, as in A1111."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def format_parameters(prompt: str, negative_prompt: str, params: dict) -> str:
    """Write A1111's parameters text: the prompt, "Negative prompt: …" if any, then "Key: value, …" in dict order.

    Keys whose value is None are left out. Values are written with str() (integral floats as integers) and quoted
    when they contain ',', ':', '"' or a newline.
    """
    if not isinstance(prompt, str) or not isinstance(negative_prompt, (str, type(None))):
        raise ValueError("prompt must be a str and negative_prompt a str or None")
    fields = []
    for key, value in params.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"parameter key {key!r} cannot be read back: use letters, digits, spaces, '-', '/'")
        if value is not None:
            fields.append(f"{key}: {_quote(_format_value(value))}")
    negative = f"\n{_NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(fields)}".strip()


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Read A1111's parameters text back into (prompt, negative_prompt, params), as parse_generation_parameters does.

    The last line holds the parameters only if it has at least three "Key: value" fields; otherwise it is part of
    the prompt. Prompt and negative prompt may span several lines; each line is stripped. Values stay strings
    (see params_to_kwargs for typed values); A1111's defaults for absent keys are not filled in.
    """
    if not isinstance(text, str):
        raise ValueError(f"parameters text must be a str, got {type(text).__name__}")
    *lines, last_line = text.strip().split("\n")
    if len(_FIELD.findall(last_line)) < 3:
        lines.append(last_line)
        last_line = ""

    prompt_lines, negative_lines = [], []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE_PREFIX):  # checked on every line, as A1111 does
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    params = {key: _unquote(value) for key, value in _FIELD.findall(last_line)}
    return _join_lines(prompt_lines), _join_lines(negative_lines), params


def _join_lines(lines: list[str]) -> str:
    """Join lines with newlines, dropping leading empty ones (A1111 appends '\\n' only once text is non-empty)."""
    text = ""
    for line in lines:
        text += ("\n" if text else "") + line
    return text


def params_to_kwargs(params: dict[str, str]) -> dict:
    """Typed keyword arguments from parsed A1111 parameters; keys we have no use for are ignored.

    Steps -> steps, Sampler -> sampler, Schedule type -> schedule, CFG scale -> cfg, Seed -> seed,
    Size "WxH" -> width, height, Clip skip -> clip_skip, Denoising strength -> strength, Model hash -> model_hash,
    Model -> model, RNG -> rng, Hires upscale -> hires_scale, Hires resize "WxH" -> hires_resize,
    Hires steps -> hires_steps, Hires upscaler -> hires_upscaler, NGMS -> ngms, NGMS all steps -> ngms_all_steps,
    Refiner -> refiner_title, Refiner switch at -> refiner_switch_at, Token merging ratio (hr) ->
    token_merging_ratio(_hr), DeepCache interval / depth -> deep_cache_interval / deep_cache_depth,
    SDXL's Original size / Target size "WxH" -> original_size / target_size (h, w), Crop "top,left" ->
    crop_top_left. Only keys present in params appear in the result.
    """
    kwargs = {}
    for key, value in params.items():
        try:
            if key == "Size":
                width, height = _SIZE.fullmatch(value.strip()).groups()
                kwargs["width"], kwargs["height"] = int(width), int(height)
            elif key == "Hires resize":
                width, height = _SIZE.fullmatch(value.strip()).groups()
                kwargs["hires_resize"] = (int(width), int(height))
            elif key in ("Original size", "Target size"):  # SDXL's size conditions, (height, width) as diffusers
                width, height = _SIZE.fullmatch(value.strip()).groups()
                kwargs[key.lower().replace(" ", "_")] = (int(height), int(width))
            elif key == "Crop":
                top, left = _CROP.fullmatch(value.strip()).groups()
                kwargs["crop_top_left"] = (int(top), int(left))
            elif key in _KWARG_NAMES:
                name, convert = _KWARG_NAMES[key]
                kwargs[name] = convert(value.strip())
        except (AttributeError, ValueError):
            raise ValueError(f"cannot read parameter {key!r} from {value!r}") from None
    return kwargs



def _png_info(text: str) -> PngInfo:
    """A PNG text chunk holding the parameters (Pillow writes iTXt when the text is not Latin-1)."""
    if not isinstance(text, str):
        raise ValueError(f"parameters text must be a str, got {type(text).__name__}")
    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, text)
    return info


def png_with_parameters(image: Image.Image, text: str) -> Image.Image:
    """The image encoded as PNG with the parameters text, reopened: its .info["parameters"] is text."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(text))
    buffer.seek(0)
    png = Image.open(buffer)
    png.load()
    return png


def save_png(image: Image.Image, path: str | PathLike, text: str) -> None:
    """Save the image as a PNG file carrying the parameters text, as A1111 saves its images."""
    image.save(path, format="PNG", pnginfo=_png_info(text))


def read_parameters(path_or_image: str | PathLike | Image.Image) -> str | None:
    """The parameters text stored in a PNG (a path or an opened image), or None if it has none."""
    if isinstance(path_or_image, Image.Image):
        return path_or_image.info.get(PNG_TEXT_KEY)
    with Image.open(path_or_image) as image:
        return image.info.get(PNG_TEXT_KEY)
