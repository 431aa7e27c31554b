"""txt2img / img2img / inpaint: equal to diffusers' pipelines on the same weights, noise and prompt; seeds; batches."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, tiny_models
from reference import diffusers_unet, diffusers_vae, transformers_clip
from sdtorch.pipeline import GenerationInterrupted, NaNError, Pipeline, Settings, seed_noise
from sdtorch.tokenizer import CLIPTokenizer

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"


def tiny_pipe(device: str = "cpu", **kwargs) -> Pipeline:
    """A pipeline of the tiny model of its own (tests that break its weights take a fresh one)."""
    return Pipeline(tiny_models(), CLIPTokenizer.default(), TINY, name="tiny", model_hash="0123456789", device=device,
                    **kwargs)


def diffusers_twin(pipe: Pipeline, folder) -> dict:
    """diffusers' UNet, VAE, text encoder and tokenizer with `pipe`'s weights (the tokenizer files go to `folder`)."""
    from transformers import CLIPTokenizer as HFTokenizer

    state = pipe.models.state_dict()
    pipe.tokenizer.save_pretrained_files(folder)
    return dict(unet=diffusers_unet(state, TINY), vae=diffusers_vae(state, TINY),
                text_encoder=transformers_clip(state, TINY),
                tokenizer=HFTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


@pytest.fixture(scope="module")
def diffusers_parts(pipe, tmp_path_factory):
    return diffusers_twin(pipe, tmp_path_factory.mktemp("tok"))


def diffusers_scheduler(name):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    sd15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1)
    if name == "DDIM":  # SD 1.x's scheduler config, as A1111's DDIM
        return DDIMScheduler(**sd15, clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
    # A1111's Euler with the "normal" schedule walks t = linspace(999, 0): diffusers' "linspace" spacing
    return EulerDiscreteScheduler(**sd15, timestep_spacing="linspace")


@pytest.mark.parametrize("sampler", ["DDIM", "Euler"])
@torch.no_grad()
def test_txt2img_equals_diffusers(pipe, diffusers_parts, sampler):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline(**diffusers_parts, scheduler=diffusers_scheduler(sampler), safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    s = Settings(PROMPT, NEGATIVE, steps=8, cfg=7.5, sampler=sampler, seed=42, width=64, height=48, batch=2,
                 convention="diffusers")  # diffusers' DDIM timesteps and its img2img step count
    ours = pipe.run(s)
    latents = seed_noise(42, 2, (4, 6, 8))  # the noise of seeds 42 and 43, as our pipeline draws it
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5, height=48, width=64,
                 latents=latents, num_images_per_prompt=2, output_type="pt").images  # (B, 3, H, W) in [0, 1]
    assert ours.shape == (2, 3, 48, 64)
    assert (to_unit(ours) - theirs).abs().max() < 1e-3


@torch.no_grad()
def test_img2img_equals_diffusers(pipe, diffusers_parts):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = StableDiffusionImg2ImgPipeline(**diffusers_parts, scheduler=diffusers_scheduler("Euler"),
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    s = Settings(PROMPT, NEGATIVE, steps=10, cfg=5.0, sampler="Euler", seed=7, width=64, height=48, strength=0.6,
                 convention="diffusers")
    ours = pipe.run(s, init_image=init)
    # diffusers takes our (deterministic, posterior-mean) init latents directly and draws the same seed's noise
    from sdtorch.images import pil_to_tensor
    init_latents = pipe.encode_image(pil_to_tensor(init))
    theirs = ref(PROMPT, image=init_latents, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=10,
                 guidance_scale=5.0, generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert (to_unit(ours) - theirs).abs().max() < 1e-3


@torch.no_grad()
def test_batch_image_k_equals_single_image_with_seed_plus_k(pipe):
    s = dict(steps=3, cfg=3.0, sampler="Euler a", width=32, height=32)
    batch = pipe.run(Settings(PROMPT, seed=100, batch=3, **s))
    single = pipe.run(Settings(PROMPT, seed=102, batch=1, **s))
    assert torch.allclose(batch[2:3], single, atol=1e-5)  # batched matmuls may round differently


@torch.no_grad()
def test_same_seed_same_settings_is_bit_identical(pipe):
    s = Settings(PROMPT, NEGATIVE, steps=4, sampler="DPM++ 2M SDE", seed=5, width=32, height=32)
    a, b = pipe.txt2img(PROMPT, NEGATIVE, steps=4, sampler="DPM++ 2M SDE", seed=5, width=32, height=32), \
        pipe.txt2img(PROMPT, NEGATIVE, steps=4, sampler="DPM++ 2M SDE", seed=5, width=32, height=32)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert torch.equal(pipe.run(s), pipe.run(Settings(**{**s.__dict__})))


def test_random_seed_is_reported_in_the_metadata(pipe):
    image = pipe.txt2img(PROMPT, steps=1, seed=-1, width=32, height=32)[0]
    params = image.info["parameters"]
    seed = int(params.split("Seed: ")[1].split(",")[0])
    assert 0 <= seed < 2 ** 32
    again = pipe.txt2img(PROMPT, steps=1, seed=seed, width=32, height=32)[0]
    assert np.array_equal(np.asarray(image), np.asarray(again))


def test_metadata_is_a1111_parameters(pipe):
    image = pipe.txt2img(PROMPT, NEGATIVE, steps=2, cfg=7, sampler="DPM++ 2M Karras", seed=3, width=32,
                         height=40, clip_skip=2)[0]
    assert image.info["parameters"] == (f"{PROMPT}\nNegative prompt: {NEGATIVE}\nSteps: 2, Sampler: DPM++ 2M, "
                                        "Schedule type: Karras, CFG scale: 7, Seed: 3, Size: 32x40, "
                                        "Model hash: 0123456789, Model: tiny, Clip skip: 2, RNG: CPU")
    assert image.size == (32, 40)


def test_inpaint_keeps_the_unmasked_part(pipe):
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half
    out = np.asarray(pipe.inpaint(PROMPT, init, mask, steps=3, seed=1, mask_blur=0)[0]).astype(int)
    original = np.asarray(init).astype(int)
    assert np.array_equal(out[:, 32:], original[:, 32:])  # outside the mask: the original pixels, exactly
    assert np.abs(out[:, :32] - original[:, :32]).mean() > 20  # inside: repainted
    blurred = np.asarray(pipe.inpaint(PROMPT, init, mask, steps=3, seed=1, mask_blur=4)[0]).astype(int)
    assert np.array_equal(blurred[:, 48:], original[:, 48:])  # the blur reaches ~3σ past the mask edge, no further
    assert not np.array_equal(blurred[:, 32:36], original[:, 32:36])


def test_9_channel_inpainting_model_gets_the_masked_image(tmp_path):
    cfg = TINY.replace(unet=TINY.unet.__class__(**{**TINY.unet.__dict__, "in_channels": 9}))
    pipe9 = Pipeline(tiny_models(cfg), CLIPTokenizer.default(), cfg, device="cpu")
    seen = []
    original = pipe9.unet.forward
    pipe9.unet.forward = lambda x, t, c: (seen.append(x.shape), original(x, t, c))[1]
    init, mask = Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("L", (32, 32), 255)
    out = pipe9.inpaint(PROMPT, init, mask, steps=2, seed=0)
    assert out[0].size == (32, 32) and seen and all(shape[1] == 9 for shape in seen)


def test_interrupt_stops_after_the_current_step(pipe):
    steps = []

    def callback(step, total, latents, sigma):
        steps.append(step)
        if step == 2:
            pipe.interrupt()

    with pytest.raises(GenerationInterrupted):
        pipe.txt2img(PROMPT, steps=6, seed=0, width=32, height=32, callback=callback)
    assert steps == [1, 2]
    assert len(pipe.txt2img(PROMPT, steps=1, seed=0, width=32, height=32)) == 1  # the flag is reset


@pytest.mark.parametrize("bad, match", [(dict(width=30), "multiple of 8"), (dict(height=0), "multiple of 8"),
                                        (dict(steps=0), "steps"), (dict(sampler="Eular"), "did you mean 'Euler'")])
def test_bad_settings_raise_value_errors(pipe, bad, match):
    with pytest.raises(ValueError, match=match):
        pipe.txt2img(PROMPT, **{**dict(steps=1, width=32, height=32), **bad})


def test_eta_is_refused_by_a_sampler_without_one(pipe):
    with pytest.raises(ValueError, match="takes no eta"):
        pipe.txt2img(PROMPT, steps=1, width=32, height=32, sampler="Euler", eta=0.5)
    assert len(pipe.txt2img(PROMPT, steps=1, width=32, height=32, sampler="Euler a", eta=0.5)) == 1


def test_strength_outside_unit_range_is_an_error(pipe):
    with pytest.raises(ValueError, match="strength"):
        pipe.img2img(PROMPT, Image.new("RGB", (32, 32)), strength=1.5, steps=1)


def to_unit(pixels):
    """[-1, 1] -> [0, 1], clamped: the image diffusers returns with output_type="pt"."""
    return ((pixels + 1) / 2).clamp(0, 1)


def pipe_to_pil(pixels):
    from sdtorch.images import tensor_to_pil
    return tensor_to_pil(pixels)[0]


@torch.no_grad()
def test_long_prompt_is_encoded_in_75_token_chunks(pipe):
    words = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "circle", "square", "triangle"]
    prompt = " ".join(words[i % len(words)] for i in range(100))  # 100 tokens, no commas, no emphasis
    tok = pipe.tokenizer
    ids = tok.encode(prompt)
    assert len(ids) == 100
    # A1111's rule, written out: chunks of 75 tokens, each BOS + 75 (padded) + EOS, encoded separately, concatenated
    chunks = [ids[:75], ids[75:]]
    rows = [[tok.bos_token_id] + c + [tok.pad_token_id] * (75 - len(c)) + [tok.eos_token_id] for c in chunks]
    expected = torch.cat([pipe.text_encoder(torch.tensor([r])) for r in rows], dim=1)  # (1, 154, D)
    cond, uncond = pipe.encode_prompts(prompt, "", clip_skip=1)
    assert cond.shape == uncond.shape == (1, 154, TINY.clip.hidden_size)  # negative padded to two chunks
    assert torch.allclose(cond, expected, atol=1e-6)
    empty = torch.tensor([[tok.bos_token_id, tok.eos_token_id] + [tok.pad_token_id] * 75])
    assert torch.allclose(uncond, pipe.text_encoder(empty).repeat(1, 2, 1), atol=1e-6)


def test_default_size_is_the_models_resolution_or_the_init_images():
    pipe32 = Pipeline(tiny_models(), CLIPTokenizer.default(), TINY.replace(resolution=32), device="cpu")
    image = pipe32.txt2img(PROMPT, steps=1, seed=0)[0]
    assert image.size == (32, 32) and "Size: 32x32" in image.info["parameters"]
    assert pipe32.img2img(PROMPT, Image.new("RGB", (44, 20)), steps=1, seed=0)[0].size == (40, 16)


def test_the_process_allocator_is_tuned_only_when_asked(tmp_path, monkeypatch):
    """keep_freed_blocks changes glibc's malloc for the whole process: a library pipeline leaves it alone, one loaded
    with tune_allocator=True (as the CLI loads it) sets it."""
    import sdtorch
    from sdtorch import memory

    calls = []
    monkeypatch.setattr(memory, "keep_freed_blocks", lambda: calls.append("tuned") or True)
    sdtorch.save(tiny_pipe(), tmp_path / "tiny.safetensors")
    sdtorch.load(tmp_path / "tiny.safetensors", device="cpu").to("cpu")
    assert calls == []
    sdtorch.load(tmp_path / "tiny.safetensors", device="cpu", tune_allocator=True)
    assert calls == ["tuned"]


def test_released_weights_give_the_same_images(tmp_path, monkeypatch):
    """A model mapped from an fp32 file gives its weights' pages back after each phase; images do not change."""
    import sdtorch
    from sdtorch.memory import resident_file_bytes
    from sdtorch.models import packed

    # bit for bit: the released pipeline's UNet would otherwise sample on packed weights (another rounding)
    monkeypatch.setattr(packed, "available", lambda: False)

    path = tmp_path / "tiny.safetensors"
    sdtorch.save(Pipeline(tiny_models(), CLIPTokenizer.default(), TINY, device="cpu"), path)
    kept, released = sdtorch.load(path, device="cpu"), sdtorch.load(path, device="cpu")
    kept.release_idle_weights = False
    images = []
    for p in (kept, released):
        images.append(p.txt2img("a red circle", steps=3, seed=1, width=64, height=48, sampler="Euler a")[0])
    if sys.platform.startswith("linux"):
        for part in ("text_encoder", "unet", "vae"):
            assert resident_file_bytes([p.data for p in getattr(kept, part).parameters()]) > 0
            assert resident_file_bytes([p.data for p in getattr(released, part).parameters()]) == 0
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    again = released.txt2img("a red circle", steps=3, seed=1, width=64, height=48, sampler="Euler a")[0]
    assert np.array_equal(np.asarray(again), np.asarray(images[0]))  # faulted back in, unchanged


@torch.no_grad()
def test_the_cpu_samples_on_packed_weights_and_frees_them_before_decoding(tmp_path):
    """On the CPU, a UNet mapped from an fp32 file runs its sampling loop on packed weights (models/packed.py); the
    packs are gone before the VAE decodes, so that they never share RAM with the decoder's activations."""
    import sdtorch
    from sdtorch.models import packed
    from sdtorch.models.upsample import Upsample

    if not packed.available() or not sys.platform.startswith("linux"):
        pytest.skip("needs oneDNN, and Linux to give mapped pages back")
    sdtorch.save(tiny_pipe(), tmp_path / "tiny.safetensors")
    pipe = sdtorch.load(tmp_path / "tiny.safetensors", device="cpu")
    unet = pipe.unet
    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    called = len(layers) - sum(isinstance(m, Upsample) for m in unet.modules())  # an Upsample folds its own kernels
    packed_per_step, at_decode = [], []
    decode = pipe.decode_latents

    def spy(latents, tiled=False):
        at_decode.append([m for m in unet.modules() if "forward" in m.__dict__])
        return decode(latents, tiled)

    pipe.decode_latents = spy
    settings = Settings(PROMPT, steps=2, seed=0, width=32, height=32)
    pixels = pipe.run(settings, callback=lambda *_: packed_per_step.append(
        sum(getattr(m.__dict__.get("forward"), "packed", None) is not None for m in layers)))
    assert packed_per_step == [called, called] and at_decode == [[]]
    plain = sdtorch.load(tmp_path / "tiny.safetensors", device="cpu")
    plain.release_idle_weights = False  # keeps its mapped pages, so it never packs
    # fp32: the packed kernels round differently (~1e-6 relative per layer); images in [-1, 1]
    assert (pixels - plain.run(settings)).abs().max().item() < 1e-4


@torch.no_grad()
def test_fp16_vae_overflow_decodes_again_in_fp32():
    pipe = tiny_pipe()
    # the decoder's first conv x1e5: its activations pass fp16's largest value (65504) and become inf, then NaN in
    # the next GroupNorm; in fp32 the GroupNorms normalise them back
    conv = pipe.vae.decoder.conv_in
    conv.weight.mul_(1e5), conv.bias.mul_(1e5)
    pipe.vae.half().float()  # fp16-representable weights, so that the fp32 decode below is the exact reference
    latents = seed_noise(1, 1, (4, 4, 4))
    reference = pipe.decode_latents(latents)
    pipe.vae.half()
    assert not torch.isfinite(pipe.vae.decode((latents / TINY.vae.scale_factor).half())).all()  # it does overflow
    out = pipe.decode_latents(latents)
    assert torch.isfinite(reference).all() and torch.equal(out, reference)
    assert next(pipe.vae.parameters()).dtype == torch.float16  # and the VAE is fp16 again afterwards


@torch.no_grad()
def test_nan_from_the_unet_or_an_fp32_vae_is_a_clear_error():
    pipe = tiny_pipe()
    pipe.vae.decoder.conv_in.bias.fill_(float("nan"))
    with pytest.raises(NaNError, match="VAE produced NaN/inf even in fp32"):
        pipe.run(Settings(PROMPT, steps=2, seed=0, width=32, height=32))
    pipe.unet.out[-1].bias.fill_(float("inf"))
    with pytest.raises(NaNError, match="UNet produced NaN/inf at step 1"):
        pipe.run(Settings(PROMPT, steps=2, seed=0, width=32, height=32))


def test_ngms_is_written_as_a1111_writes_it_and_read_back(pipe):
    """NGMS changes the image, is written into the PNG text only when it skipped a pass (A1111 adds the key from
    inside the loop), and --from's reading of the text repeats the image."""
    from sdtorch.cli import a1111_settings
    from sdtorch.metadata import params_to_kwargs, parse_parameters

    settings = dict(steps=6, sampler="Euler", seed=4, width=32, height=32)
    base = pipe.txt2img(PROMPT, NEGATIVE, **settings)[0]
    fast = pipe.txt2img(PROMPT, NEGATIVE, ngms=2.0, ngms_all_steps=True, **settings)[0]
    unused = pipe.txt2img(PROMPT, NEGATIVE, ngms=1e-4, **settings)[0]  # below every σ of the schedule
    assert not np.array_equal(np.asarray(base), np.asarray(fast))
    assert np.array_equal(np.asarray(base), np.asarray(unused)) and "NGMS" not in unused.info["parameters"]
    text = fast.info["parameters"]
    assert text.endswith("NGMS: 2, NGMS all steps: True")
    prompt, negative, params = parse_parameters(text)
    again = pipe.txt2img(prompt, negative, **{k: v for k, v in a1111_settings(params_to_kwargs(params)).items()
                                              if k not in ("prompt", "negative")})[0]
    assert np.array_equal(np.asarray(fast), np.asarray(again))


def test_a_cpu_without_native_bf16_or_fp16_is_warned_about(monkeypatch):
    """bf16/fp16 on a CPU without their kernels (e.g. AVX2-only: bf16 60-100x slower than fp32) warns; with them (or
    in fp32) it does not. Whether this CPU has them is read from oneDNN."""
    import warnings

    import sdtorch.pipeline as pipeline

    assert pipeline.cpu_runs_natively(torch.float32)
    assert pipeline.cpu_runs_natively(torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    pipe = tiny_pipe()
    monkeypatch.setattr(pipeline, "cpu_runs_natively", lambda dtype: False)
    with pytest.warns(UserWarning, match="no native bf16 kernels"):
        pipe.to(dtype="bf16")
    monkeypatch.setattr(pipeline, "cpu_runs_natively", lambda dtype: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.to(dtype="fp16")
        pipe.to(dtype="fp32")
