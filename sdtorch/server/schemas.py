"""A1111's request bodies (modules/api/models.py): the same field names and defaults, typed so that a wrong type is a
422 naming the field. Fields we do not use are still accepted (clients send dozens) and echoed back in "parameters".

A1111 builds these models from StableDiffusionProcessing's __init__, where every field may be null; a null here
means "the default", so clients that send `"styles": null` work as they do with A1111.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PROMPT_CHARS = 20_000  # ~270 chunks of 75 tokens; A1111 has no limit, but context memory grows with it
MAX_STEPS, MAX_BATCH, MAX_ITERATIONS = 1000, 64, 100


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if v is not None or k not in cls.model_fields or cls.model_fields[k].default is None}
        return data


class GenerationRequest(_Lenient):
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    styles: list[str] = []
    seed: int = Field(-1, ge=-1, lt=2 ** 62)
    subseed: int = Field(-1, ge=-1, lt=2 ** 62)
    subseed_strength: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # A1111's API default sampler (used when sampler_name is absent)
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    n_iter: int = Field(1, ge=1, le=MAX_ITERATIONS)
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0, le=100, allow_inf_nan=False)
    width: int | None = Field(None, gt=0)  # None: the model's resolution (512 for SD 1.x, as A1111's default)
    height: int | None = Field(None, gt=0)
    eta: float | None = Field(None, ge=0, le=10, allow_inf_nan=False)
    s_min_uncond: float | None = Field(None, ge=0, le=1000, allow_inf_nan=False)  # NGMS; None: the option's (0)
    # A1111's refiner: a model title from /sdapi/v1/sd-models, and where it takes over (None: 0.8, the UI's default)
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    override_settings: dict[str, Any] = {}
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False


class Txt2ImgRequest(GenerationRequest):
    denoising_strength: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)  # hires fix's; None: 0.75
    # A1111's hires fix (StableDiffusionProcessingTxt2Img): a second img2img pass at a larger size
    enable_hr: bool = False
    hr_scale: float = Field(2.0, gt=0, le=8, allow_inf_nan=False)
    hr_upscaler: str | None = None  # None: "Latent", A1111's default latent mode
    hr_second_pass_steps: int = Field(0, ge=0, le=MAX_STEPS)
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    hr_sampler_name: str | None = None  # only "Use same sampler" (or the same name): one sampler per job here
    hr_scheduler: str | None = None
    hr_checkpoint_name: str | None = None
    hr_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    hr_negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] | None = Field(None, max_length=1)
    resize_mode: int = Field(0, ge=0, le=2)  # 3 (latent upscale) is not supported
    denoising_strength: float = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    mask: str | None = None
    mask_blur: int | None = Field(None, ge=0, le=64)
    mask_blur_x: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


class PNGInfoRequest(BaseModel):
    image: str


class ProgressQuery(BaseModel):
    skip_current_image: bool = False
