"""LoRA / LyCORIS networks: every layout gives the outputs diffusers' `load_lora_weights` gives on the same weights
(fp32, <= 1e-5 relative), or the ΔW formula written out where diffusers has no counterpart; switching networks puts
the base weights back bit for bit."""
import hashlib

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import TINY, tiny_models
from reference import diffusers_unet, max_rel_err, transformers_clip
from sdtorch.checkpoint.diffusers_keys import to_diffusers, unet_rules
from sdtorch.lora import AppliedNetworks, NetworkError, find_file, read_network
from sdtorch.lora import _module as lora_module
from sdtorch.prompts import extract_lora_tags

RANK, ALPHA = 4, 2.0


def unet_layers(models):
    """(our module name, diffusers name, module) of every Linear/Conv2d of the UNet."""
    rules = unet_rules(models.unet.config)
    return [(name, to_diffusers(name + ".weight", rules).removesuffix(".weight"), m)
            for name, m in models.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def te_layers(models):
    return [(name, m) for name, m in models.text_encoder.named_modules() if isinstance(m, nn.Linear)]


def low_rank(weight: torch.Tensor, g: torch.Generator, rank: int = RANK):
    """(down, up) for a weight: a 3x3 conv gets a 3x3 down and a 1x1 up (LoCon), as kohya writes them."""
    if weight.dim() == 2:
        return 0.1 * torch.randn(rank, weight.shape[1], generator=g), 0.1 * torch.randn(weight.shape[0], rank,
                                                                                          generator=g)
    return (0.1 * torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=g),
            0.1 * torch.randn(weight.shape[0], rank, 1, 1, generator=g))


def kohya_file(path, models, seed=0, text_encoder=True, alpha=ALPHA):
    """A kohya-ss LoRA with every UNet layer (LoCon: convs too) and, optionally, the text encoder's linears."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    targets = [("lora_unet_" + d.replace(".", "_"), m) for _, d, m in unet_layers(models)]
    if text_encoder:
        targets += [("lora_te_text_model_" + name.replace(".", "_"), m) for name, m in te_layers(models)]
    for key, m in targets:
        down, up = low_rank(m.weight, g)
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                      f"{key}.alpha": torch.tensor(alpha)})
    save_file(state, str(path), metadata={"ss_network_dim": str(RANK)})
    return state


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 600]),
            torch.randn(2, 77, TINY.unet.context_dim, generator=g), torch.randint(0, 49408, (2, 77), generator=g))


def apply(models, *networks):
    applied = AppliedNetworks(models)
    applied.set(list(networks))
    return applied


@torch.no_grad()
def formula_outputs(base, updates):
    """The UNet's and text encoder's outputs with W + Σ ΔW·m merged by hand into a copy of `base` (models or a
    state dict): updates = {(part, name): [ΔW·scale·multiplier, ...]}, added in order."""
    merged = tiny_models()
    merged.load_state_dict(base if isinstance(base, dict) else base.state_dict())
    for (part, name), deltas in updates.items():
        weight = getattr(merged, part).get_submodule(name).weight
        for delta in deltas:
            weight += delta.reshape(weight.shape)
    x, t, ctx, ids = inputs()
    return merged.unet(x, t, ctx), merged.text_encoder(ids)


@torch.no_grad()
def outputs(models):
    x, t, ctx, ids = inputs()
    return models.unet(x, t, ctx), models.text_encoder(ids)


def kohya_updates(state, models, multiplier_unet=1.0, multiplier_te=1.0):
    updates = {}
    names = {"lora_unet_" + d.replace(".", "_"): ("unet", n) for n, d, _ in unet_layers(models)}
    names.update({"lora_te_text_model_" + n.replace(".", "_"): ("text_encoder", n) for n, _ in te_layers(models)})
    for key, target in names.items():
        if f"{key}.lora_down.weight" not in state:
            continue
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        m = multiplier_unet if target[0] == "unet" else multiplier_te
        updates[target] = [delta * (state[f"{key}.alpha"] / down.shape[0]) * m]
    return updates


# ---- kohya-ss / A1111 ------------------------------------------------------------------------------------------------

def test_kohya_lora_equals_diffusers_load_lora_weights_on_the_unet(tmp_path):
    """Every UNet layer, 3x3 convs included (LoCon), alpha/rank scaling: diffusers converts the same file itself."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    models = tiny_models()
    kohya_file(tmp_path / "k.safetensors", models, text_encoder=False)
    reference = diffusers_unet({k: v.clone() for k, v in models.state_dict().items()}, TINY)
    network = read_network(tmp_path / "k.safetensors", models)
    assert len(network.layers) == len(unet_layers(models)) and not network.unmatched
    base = outputs(models)[0]
    apply(models, (network, 1.0, 1.0))
    state, alphas = Loader.lora_state_dict(str(tmp_path / "k.safetensors"))
    Loader.load_lora_into_unet(state, alphas, reference)
    x, t, ctx, _ = inputs()
    with torch.no_grad():
        theirs = reference(x, t, encoder_hidden_states=ctx).sample
    ours = outputs(models)[0]
    assert max_rel_err(ours, theirs) <= 1e-5
    assert max_rel_err(base, theirs) > 1e-2  # the LoRA changes the output: the comparison can fail


def test_kohya_lora_equals_the_formula_with_separate_multipliers(tmp_path):
    """W + up·down·(alpha/rank)·multiplier, the UNet's and the text encoder's multipliers apart."""
    models = tiny_models()
    state = kohya_file(tmp_path / "k.safetensors", models)
    network = read_network(tmp_path / "k.safetensors", models)
    expected = formula_outputs(models, kohya_updates(state, models, 0.7, -0.4))
    apply(models, (network, 0.7, -0.4))
    for ours, ref in zip(outputs(models), expected, strict=True):
        assert max_rel_err(ours, ref) <= 1e-5


def test_two_loras_at_once_and_switching_restores_the_base_bit_for_bit(tmp_path):
    models = tiny_models()
    base_state = {k: v.clone() for k, v in models.state_dict().items()}
    state_a = kohya_file(tmp_path / "a.safetensors", models, seed=1)
    state_b = kohya_file(tmp_path / "b.safetensors", models, seed=2)
    a, b = read_network(tmp_path / "a.safetensors", models), read_network(tmp_path / "b.safetensors", models)
    updates = kohya_updates(state_a, models, 0.8, 0.8)
    for key, deltas in kohya_updates(state_b, models, 0.5, 1.2).items():
        updates[key] = updates.get(key, []) + deltas
    expected = formula_outputs(models, updates)
    applied = apply(models, (a, 0.8, 0.8), (b, 0.5, 1.2))
    for ours, ref in zip(outputs(models), expected, strict=True):
        assert max_rel_err(ours, ref) <= 1e-5
    applied.set([(b, 1.0, 1.0)])  # switch: base + b only
    expected_b = formula_outputs(base_state, kohya_updates(state_b, models))
    for ours, ref in zip(outputs(models), expected_b, strict=True):
        assert max_rel_err(ours, ref) <= 1e-5
    applied.set([])
    assert all(torch.equal(v, base_state[k]) for k, v in models.state_dict().items())


# ---- diffusers / PEFT ------------------------------------------------------------------------------------------------

def peft_file(path, models, reference_te, seed=3):
    """A diffusers/PEFT LoRA (lora_A/lora_B, no alphas: scale 1) for the UNet and the text encoder."""
    g = torch.Generator().manual_seed(seed)
    te_prefix = "text_encoder.text_model." if hasattr(reference_te, "text_model") else "text_encoder."
    state = {}
    targets = [("unet." + d, m) for _, d, m in unet_layers(models) if "attentions" in d and isinstance(m, nn.Linear)]
    targets += [(te_prefix + name, m) for name, m in te_layers(models)]
    for key, m in targets:
        down, up = low_rank(m.weight, g)
        state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
    save_file(state, str(path))


def test_peft_lora_equals_diffusers_on_unet_and_text_encoder(tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    models = tiny_models()
    checkpoint = {k: v.clone() for k, v in models.state_dict().items()}
    ref_unet, ref_te = diffusers_unet(checkpoint, TINY), transformers_clip(checkpoint, TINY)
    peft_file(tmp_path / "p.safetensors", models, ref_te)
    network = read_network(tmp_path / "p.safetensors", models)
    assert not network.unmatched and {part for part, _ in network.layers} == {"unet", "text_encoder"}
    apply(models, (network, 1.0, 1.0))
    state, alphas = Loader.lora_state_dict(str(tmp_path / "p.safetensors"))
    Loader.load_lora_into_unet({k: v for k, v in state.items() if k.startswith("unet.")}, alphas, ref_unet)
    Loader.load_lora_into_text_encoder({k: v for k, v in state.items() if k.startswith("text_encoder.")}, alphas,
                                       ref_te, prefix="text_encoder")
    x, t, ctx, ids = inputs()
    with torch.no_grad():
        unet_ref = ref_unet(x, t, encoder_hidden_states=ctx).sample
        te_ref = ref_te(ids).last_hidden_state
    ours_unet, ours_te = outputs(models)
    assert max_rel_err(ours_unet, unet_ref) <= 1e-5
    assert max_rel_err(ours_te, te_ref) <= 1e-5
    assert max_rel_err(transformers_clip(checkpoint, TINY)(ids).last_hidden_state, te_ref) > 1e-2


def test_old_diffusers_attention_processor_keys(tmp_path):
    """unet.….attn1.processor.to_q_lora.down.weight (diffusers < 0.17) is the LoRA of attn1.to_q."""
    models = tiny_models()
    name, d, m = next(layer for layer in unet_layers(models) if layer[0].endswith("attn1.to_out.0"))
    g = torch.Generator().manual_seed(0)
    down, up = low_rank(m.weight, g)
    key = "unet." + d.removesuffix(".to_out.0") + ".processor.to_out_lora"
    save_file({f"{key}.down.weight": down, f"{key}.up.weight": up}, str(tmp_path / "old.safetensors"))
    expected = formula_outputs(models, {("unet", name): [up @ down * 0.6]})
    apply(models, (read_network(tmp_path / "old.safetensors", models), 0.6, 0.6))
    assert max_rel_err(outputs(models)[0], expected[0]) <= 1e-5


# ---- LyCORIS ---------------------------------------------------------------------------------------------------------

def lycoris_case(kind, m, g):
    """(tensors of one layer, its ΔW before multiplier) for LoHa / LoKr / DoRA, the formulas written out."""
    out_f, in_f = m.weight.shape[:2]
    if kind == "loha":
        t = {k: 0.2 * torch.randn(s, generator=g) for k, s in
             (("hada_w1_a", (out_f, RANK)), ("hada_w1_b", (RANK, in_f)), ("hada_w2_a", (out_f, RANK)),
              ("hada_w2_b", (RANK, in_f)))}
        t["alpha"] = torch.tensor(ALPHA)
        return t, (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * ALPHA / RANK
    if kind == "lokr":  # w1 full (4 x 4), w2 low-rank: alpha/rank applies
        t = {"lokr_w1": 0.2 * torch.randn(4, 4, generator=g),
             "lokr_w2_a": 0.2 * torch.randn(out_f // 4, 2, generator=g),
             "lokr_w2_b": 0.2 * torch.randn(2, in_f // 4, generator=g), "alpha": torch.tensor(1.0)}
        return t, torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * 1.0 / 2
    # DoRA: the merged weight's columns rescaled to dora_scale (A1111's network.apply_weight_decompose)
    down, up = low_rank(m.weight, g)
    t = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(ALPHA),
         "dora_scale": 1 + 0.1 * torch.randn(1, in_f, generator=g)}
    merged = m.weight.detach() + up @ down * ALPHA / RANK
    return t, None if merged is None else (merged, t["dora_scale"])


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_lycoris_and_dora_equal_their_formulas(tmp_path, kind):
    models = tiny_models()
    g = torch.Generator().manual_seed(5)
    state, updates = {}, {}
    for name, d, m in unet_layers(models):
        if isinstance(m, nn.Linear) and "attentions" in d and m.weight.shape[0] % 4 == 0 and m.weight.shape[1] % 4 == 0:
            tensors, delta = lycoris_case(kind, m, g)
            state.update({f"lora_unet_{d.replace('.', '_')}.{k}": v for k, v in tensors.items()})
            if kind == "dora":
                merged, scale = delta
                norm = merged.norm(dim=0, keepdim=True)  # per input column, over the outputs
                delta = merged * (scale / norm) - m.weight.detach()
            updates[("unet", name)] = [delta * 0.9]
    save_file(state, str(tmp_path / f"{kind}.safetensors"))
    expected = formula_outputs(models, updates)
    network = read_network(tmp_path / f"{kind}.safetensors", models)
    assert len(network.layers) == len(updates)
    apply(models, (network, 0.9, 0.9))
    assert max_rel_err(outputs(models)[0], expected[0]) <= 1e-5


# ---- files and errors ------------------------------------------------------------------------------------------------

def test_other_families_and_non_loras_are_refused_and_unmatched_keys_reported(tmp_path):
    models = tiny_models()
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4)},
              str(tmp_path / "xl.safetensors"))
    with pytest.raises(NetworkError, match="SDXL"):
        read_network(tmp_path / "xl.safetensors", models)
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(NetworkError, match="not a LoRA"):
        read_network(tmp_path / "none.safetensors", models)
    state = kohya_file(tmp_path / "k.safetensors", models, text_encoder=False)
    state["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 8)
    state["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 4)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.warns(UserWarning, match="1 of its .* layers match no layer of this model"):
        assert read_network(tmp_path / "extra.safetensors", models).unmatched == ["lora_unet_no_such_layer"]
    bad = dict(state)
    key = next(k for k in bad if k.endswith("lora_down.weight") and bad[k].dim() == 2)
    bad[key] = torch.zeros(RANK, bad[key].shape[1] + 1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(NetworkError, match=key.removesuffix(".lora_down.weight")):
        read_network(tmp_path / "bad.safetensors", models)


def test_pickled_lora_goes_through_the_safe_loader(tmp_path):
    models = tiny_models()
    state = kohya_file(tmp_path / "k.safetensors", models)
    torch.save(state, tmp_path / "k.pt")
    a, b = read_network(tmp_path / "k.safetensors", models), read_network(tmp_path / "k.pt", models)
    assert a.layers.keys() == b.layers.keys()


def test_lora_hash_is_a1111s_addnet_hash(tmp_path):
    """sha256 of the bytes after the safetensors header (kohya's "addnet" hash), first 12 hex digits."""
    models = tiny_models()
    kohya_file(tmp_path / "k.safetensors", models)
    raw = (tmp_path / "k.safetensors").read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    assert read_network(tmp_path / "k.safetensors", models).short_hash == hashlib.sha256(raw[start:]).hexdigest()[:12]


def test_find_file_lists_close_matches(tmp_path):
    (tmp_path / "style").mkdir()
    (tmp_path / "style" / "watercolor_v2.safetensors").write_bytes(b"x")
    assert find_file("watercolor_v2", tmp_path).name == "watercolor_v2.safetensors"
    with pytest.raises(NetworkError, match="close matches: watercolor_v2"):
        find_file("watercolour_v2", tmp_path)


@pytest.mark.parametrize("prompt, text, tags", [
    ("a cat <lora:ink:0.8>", "a cat ", [("ink", 0.8, 0.8)]),
    ("<lora:ink>a cat", "a cat", [("ink", 1.0, 1.0)]),
    ("a cat <lora:ink:0.5:1.2>", "a cat ", [("ink", 1.2, 0.5)]),  # A1111's order: te, then unet
    ("<lora:ink:1:unet=0.3>, <lyco:hat:te=0.5>", ", ", [("ink", 0.3, 1.0), ("hat", 0.5, 0.5)]),
    ("a <hypernet:x:1> cat", "a <hypernet:x:1> cat", []),  # other extra networks are left alone
])
def test_lora_tags_are_read_as_a1111_reads_them(prompt, text, tags):
    assert extract_lora_tags(prompt) == (text, tags)


def test_bad_lora_tags_are_one_clear_error():
    with pytest.raises(ValueError, match="numbers"):
        extract_lora_tags("<lora:ink:strong>")


# ---- in the pipeline -------------------------------------------------------------------------------------------------

def lora_pipe(tmp_path, **kwargs):
    from sdtorch.pipeline import Pipeline
    from sdtorch.tokenizer import CLIPTokenizer

    return Pipeline(tiny_models(), CLIPTokenizer.default(), TINY, name="tiny", device="cpu",
                    lora_dir=tmp_path, embeddings_dir=tmp_path, **kwargs)


GENERATE = dict(steps=3, width=32, height=32, sampler="Euler", seed=3, cfg=5)


def pixels(image):
    import numpy as np

    return np.asarray(image).astype(int)


def test_pipeline_tags_kwargs_negative_prompt_and_metadata(tmp_path):
    """<lora:ink:0.7> in the prompt, loras={"ink": 0.7} and the tag in the negative prompt all merge the same LoRA;
    the PNG text keeps the tag and carries A1111's Lora hashes; a generation without LoRAs is the base image again."""
    from sdtorch.metadata import parse_parameters

    kohya_file(tmp_path / "ink.safetensors", tiny_models())
    pipe = lora_pipe(tmp_path)
    base_state = {k: v.clone() for k, v in pipe.models.state_dict().items()}
    base = pipe.txt2img("a red circle", **GENERATE)[0]
    tagged = pipe.txt2img("a red circle <lora:ink:0.7>", **GENERATE)[0]
    by_kwarg = pipe.txt2img("a red circle ", loras={"ink": 0.7}, **GENERATE)[0]
    in_negative = pipe.txt2img("a red circle ", "<lora:ink:0.7>", **GENERATE)[0]
    assert (pixels(tagged) == pixels(by_kwarg)).all() and (pixels(tagged) == pixels(in_negative)).all()
    assert abs(pixels(tagged) - pixels(base)).max() > 8
    prompt, _, params = parse_parameters(by_kwarg.info["parameters"])
    assert prompt == "a red circle <lora:ink:0.7:0.7>"
    assert params["Lora hashes"] == f"ink: {read_network(tmp_path / 'ink.safetensors', pipe.models).short_hash}"
    again = pipe.txt2img("a red circle", **GENERATE)[0]
    assert (pixels(again) == pixels(base)).all() and "Lora hashes" not in again.info["parameters"]
    assert all(torch.equal(v, base_state[k]) for k, v in pipe.models.state_dict().items())
    with pytest.raises(NetworkError, match="close matches: ink"):
        pipe.txt2img("<lora:inc:1>", **GENERATE)


def test_merged_weights_in_the_packed_memory_mapped_pipeline(tmp_path):
    """An fp32 file is memory-mapped and its UNet packed for oneDNN during sampling, its pages released between
    phases. A merged weight is ordinary memory that release cannot drop: it is packed, and then the layer holds its
    original again (one copy in RAM, the pack), while the untouched mapped weights are packed as usual; the image
    equals the one of the plain pipeline. Each model carries the LoRA only for its own phase (the text encoder's
    layers are back while the UNet samples), and after the generation every weight is the file's own bytes again."""
    import sdtorch
    from sdtorch.models import packed

    state = kohya_file(tmp_path / "all.safetensors", tiny_models())
    attention_only = {k: v for k, v in state.items() if "attentions" in k or "lora_te" in k}
    save_file(attention_only, str(tmp_path / "ink.safetensors"))
    sdtorch.save(lora_pipe(tmp_path), tmp_path / "model.safetensors")
    mapped = sdtorch.load(tmp_path / "model.safetensors", device="cpu", lora_dir=tmp_path)
    plain = sdtorch.load(tmp_path / "model.safetensors", device="cpu", lora_dir=tmp_path)
    plain.release_idle_weights = False  # no packing, no releasing: the reference
    seen = {}

    def look(step, total, latents, sigma):
        if step == 1 and packed.available():
            layers = [m for m in mapped.unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                      and isinstance(m.__dict__.get("forward"), packed._PackedForward)
                      and m.weight.nbytes > 4 * 4096]
            merged = {id(m) for m in mapped.networks.originals}
            seen["merged packed"] = [m.forward.packed is not None and m.forward.carries_merge
                                     and m.weight is mapped.networks.originals[m] for m in layers if id(m) in merged]
            seen["others packed"] = [m.forward.packed is not None for m in layers if id(m) not in merged]
        text_encoder_layers = {id(m) for m in mapped.text_encoder.modules()}
        seen["merged now"] = (len(mapped.networks.originals),
                              sum(id(m) in text_encoder_layers for m in mapped.networks.originals))

    image = mapped.txt2img("a cat <lora:ink:1:unet=0.8>", callback=look, **GENERATE)[0]
    reference = plain.txt2img("a cat <lora:ink:1:unet=0.8>", **GENERATE)[0]
    assert abs(pixels(image) - pixels(reference)).max() <= 1
    if packed.available():
        assert seen["merged packed"] and all(seen["merged packed"]) and any(seen["others packed"])
    assert seen["merged now"][0] > 0 and seen["merged now"][1] == 0  # UNet layers merged, text encoder's not
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "model.safetensors")
    assert not mapped.networks.originals
    assert all(torch.equal(v, stored[k]) for k, v in mapped.models.state_dict().items())
    mapped.txt2img("a cat", **GENERATE)
    assert all(torch.equal(v, stored[k]) for k, v in mapped.models.state_dict().items())


# ---- SD 2.x and SDXL -------------------------------------------------------------------------------------------------

def family_lora(models, layout: str, g: torch.Generator) -> tuple[dict, dict]:
    """A LoRA of every UNet Linear and every text-tower Linear of `models` (SD 2.x or SDXL), keyed as kohya writes
    such files (SD 2.x: lora_unet_ with diffusers' names, lora_te_; SDXL: lora_unet_ with the original layout's
    names, lora_te1_/lora_te2_) or as diffusers/PEFT do (unet., text_encoder., text_encoder_2.); and the expected
    ΔW·alpha/rank per (part, module name), before multipliers."""
    rules, state, deltas = unet_rules(models.unet.config), {}, {}
    sdxl = models.config.family == "sdxl"
    targets = []
    for name, m in models.unet.named_modules():
        if isinstance(m, nn.Linear):
            diffusers = to_diffusers(name + ".weight", rules).removesuffix(".weight")
            key = {"kohya": "lora_unet_" + (name if sdxl else diffusers).replace(".", "_"),
                   "diffusers": "unet." + diffusers}[layout]
            targets.append((key, ("unet", name), m))
    for i, tower in enumerate(models.text_encoders):
        part = "text_encoder" if i == 0 else "text_encoder_2"
        for name, m in tower.named_modules():
            if isinstance(m, nn.Linear):
                kohya = f"lora_te{i + 1}_" if sdxl else "lora_te_"
                key = {"kohya": kohya + "text_model_" + name.replace(".", "_"),
                       "diffusers": f"{part}.text_model.{name}"}[layout]
                targets.append((key, (part, name), m))
    for key, target, m in targets:
        down, up = low_rank(m.weight, g)
        if layout == "kohya":
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                          f"{key}.alpha": torch.tensor(ALPHA)})
            deltas[target] = (up @ down) * (ALPHA / RANK)
        else:  # PEFT without alpha: scale 1
            state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
            deltas[target] = up @ down
    return state, deltas


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_loras_merge_into_every_tower_by_the_formula(tmp_path, family, layout):
    """Every layer of an SD 2.x or SDXL LoRA lands on its layer, in the UNet and in each text tower (SDXL's bigG is
    text_encoder_2), as W + ΔW·alpha/rank·multiplier; restoring gives the very same tensors back."""
    from reference import randomize_
    from sdtorch.models import StableDiffusionModels
    from conftest import TINY_SDXL
    from test_families import TINY_SD2

    models = randomize_(StableDiffusionModels({"sd2": TINY_SD2, "sdxl": TINY_SDXL}[family]), seed=3)
    state, deltas = family_lora(models, layout, torch.Generator().manual_seed(1))
    save_file(state, str(tmp_path / "f.safetensors"))
    network = read_network(tmp_path / "f.safetensors", models)
    assert set(network.layers) == set(deltas) and not network.unmatched
    assert {part for part, _ in deltas} == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl"
                                            else {"unet", "text_encoder"})
    base = {k: v.clone() for k, v in models.state_dict().items()}
    originals = {target: lora_module(models, *target).weight for target in deltas}
    applied = apply(models, (network, 0.7, 0.4))
    for (part, name), delta in deltas.items():
        expected = originals[(part, name)] + delta * (0.7 if part == "unet" else 0.4)
        torch.testing.assert_close(lora_module(models, part, name).weight, expected, rtol=1e-6, atol=1e-7)
    applied.restore()
    assert all(lora_module(models, *t).weight is w for t, w in originals.items())
    assert all(torch.equal(v, base[k]) for k, v in models.state_dict().items())


def test_a_lora_for_another_family_is_refused_naming_both(tmp_path):
    from reference import randomize_
    from sdtorch.models import StableDiffusionModels
    from conftest import TINY_SDXL
    from test_families import TINY_SD2

    sd2 = randomize_(StableDiffusionModels(TINY_SD2), seed=3)
    sdxl = randomize_(StableDiffusionModels(TINY_SDXL), seed=3)
    state, _ = family_lora(sdxl, "kohya", torch.Generator().manual_seed(1))  # lora_te1_/lora_te2_ keys: SDXL's
    save_file(state, str(tmp_path / "xl.safetensors"))
    with pytest.raises(NetworkError, match="a LoRA for SDXL; this model is SD 2.x"):
        read_network(tmp_path / "xl.safetensors", sd2)
    state, _ = family_lora(sd2, "kohya", torch.Generator().manual_seed(1))
    save_file(state, str(tmp_path / "v1.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(NetworkError, match="a LoRA for SD 1.x; this model is SDXL"):
        read_network(tmp_path / "v1.safetensors", sdxl)


def test_an_sdxl_pipeline_applies_a_tagged_lora_to_both_towers_and_the_unet(tmp_path):
    """<lora:NAME:W> on an SDXL pipeline: the image equals the one of a pipeline whose weights were merged by hand,
    and afterwards every weight is the base's again."""
    from reference import randomize_
    from sdtorch.models import StableDiffusionModels
    from sdtorch.pipeline import Pipeline
    from sdtorch.tokenizer import CLIPTokenizer
    from conftest import TINY_SDXL

    models = randomize_(StableDiffusionModels(TINY_SDXL), seed=3).eval()
    state, deltas = family_lora(models, "kohya", torch.Generator().manual_seed(1))
    save_file(state, str(tmp_path / "xl.safetensors"))
    base = {k: v.clone() for k, v in models.state_dict().items()}
    by_hand = randomize_(StableDiffusionModels(TINY_SDXL), seed=3).eval()
    with torch.no_grad():
        for (part, name), delta in deltas.items():
            lora_module(by_hand, part, name).weight += delta * (0.6 if part == "unet" else 0.8)
    settings = dict(steps=2, width=64, height=64, seed=2, sampler="Euler")
    pipe = Pipeline(models, CLIPTokenizer.default(), TINY_SDXL, device="cpu", lora_dir=tmp_path)
    image = pipe.txt2img("a cat <lora:xl:0.8:0.6>", **settings)[0]
    reference = Pipeline(by_hand, CLIPTokenizer.default(), TINY_SDXL, device="cpu").txt2img("a cat", **settings)[0]
    # 8-bit images: the fused addmm and the hand-written W + ΔW round differently (~1e-7), at most one level apart
    assert abs(pixels(image) - pixels(reference)).max() <= 1
    assert "Lora hashes" in image.info["parameters"]
    assert all(torch.equal(v, base[k]) for k, v in models.state_dict().items())
