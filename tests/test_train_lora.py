"""`sdtorch train lora`: a kohya-format file with kohya's ss_* metadata, which diffusers' load_lora_weights loads to
the same UNet outputs sdtorch gives it, and whose text-encoder part merges to the training-time outputs."""
import argparse

import pytest
import torch
from safetensors import safe_open

from conftest import TINY, tiny_models
from reference import diffusers_unet, max_rel_err
from sdtorch.checkpoint import save_checkpoint
from sdtorch.lora import AppliedNetworks, read_network
from sdtorch.train.cli import add_train_parser, run_train


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _train(tmp_path, out, *extra, steps=3):
    argv = ["train", "lora", "--init", str(tmp_path / "base.safetensors"), "--data", "shapes", "--data-size", "12",
            "--resolution", "32", "--holdout", "2", "--out", str(tmp_path / out), "--steps", str(steps),
            "--batch-size", "2", "--rank", "4", "--alpha", "2", "--lr", "1e-2", "--warmup-steps", "0", "--quiet",
            "--sample-every", "100", "--eval-every", "100", *extra]
    assert run_train(_parse(argv)) == 0
    return tmp_path / out / "model.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lora")
    save_checkpoint(tiny_models(TINY), tmp_path / "base.safetensors")
    return tmp_path, _train(tmp_path, "run", "--text-encoder")


def test_the_file_is_kohya_format_with_its_metadata(trained):
    _, path = trained
    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        ups = [f.get_tensor(k) for k in keys if k.endswith("lora_up.weight")]
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert {k.rsplit(".", 2 if k.endswith("weight") else 1)[-2 if k.endswith("weight") else -1] for k in keys} \
        == {"lora_down", "lora_up", "alpha"}
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    # 12 training items: the shapes source draws its held-out items apart from them
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_num_train_images"] == "12"
    assert metadata["ss_sd_model_name"] == "base.safetensors" and metadata["ss_base_model_version"] == "sd_v1"
    assert any(u.abs().max() > 0 for u in ups)  # it learned: up starts at zero


def test_diffusers_loads_the_trained_lora_to_the_same_unet_outputs(trained):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    tmp_path, path = trained
    models = tiny_models(TINY)
    reference = diffusers_unet({k: v.clone() for k, v in models.state_dict().items()}, TINY)
    network = read_network(path, models)
    assert not network.unmatched
    AppliedNetworks(models).set([(network, 1.0, 1.0)])
    state, alphas = Loader.lora_state_dict(str(path))
    Loader.load_lora_into_unet({k: v for k, v in state.items() if k.startswith("unet.")}, alphas, reference)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([5, 700]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ours, theirs = models.unet(x, t, ctx), reference(x, t, encoder_hidden_states=ctx).sample
        base = tiny_models(TINY).unet(x, t, ctx)
    assert max_rel_err(ours, theirs) <= 1e-5 and max_rel_err(base, theirs) > 1e-4


@torch.no_grad()
def test_merged_file_equals_the_training_time_layers(trained):
    """The text encoder's LoRA merged from the file (W + up·down·alpha/rank) gives what the trained pairs beside the
    frozen layers gave (diffusers 0.42.1 drops kohya text-encoder keys, so this is the check for that part)."""
    from sdtorch.train.lora import LoraObjective

    tmp_path, path = trained
    models, hooked = tiny_models(TINY), tiny_models(TINY)
    objective = LoraObjective(hooked, torch.zeros(1, 77, dtype=torch.long), rank=4, alpha=2, text_encoder=True)
    with safe_open(str(path), "pt") as f:
        names = [k for k in f.keys() if k.endswith(".weight")]  # noqa: SIM118 (safe_open is no dict)
        objective.load_state_dict({f"lora.{k.rsplit('.', 2)[0]}.{k.rsplit('.', 2)[1]}.weight": f.get_tensor(k)
                                   for k in names})
    AppliedNetworks(models).set([(read_network(path, models), 1.0, 1.0)])
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(1))
    assert max_rel_err(models.text_encoder(ids), hooked.text_encoder(ids)) <= 1e-5


def test_resume_continues_exactly(trained):
    """Checkpoints hold the LoRA pairs alone; a run stopped after step 2 and resumed ends where a straight run does."""
    tmp_path, _ = trained
    straight = _train(tmp_path, "straight", steps=3)
    _train(tmp_path, "resumed", "--ckpt-every", "1", "--keep-checkpoints", "3", steps=3)
    step_2 = tmp_path / "resumed" / "checkpoints" / "step-00000002.pt"
    resumed = _train(tmp_path, "resumed", "--resume", str(step_2), steps=3)  # step 3 again, from step 2's state
    checkpoint = torch.load(next((tmp_path / "resumed" / "checkpoints").glob("*.pt")), weights_only=True)
    assert all(k.startswith("lora.") for k in checkpoint["model"])
    with safe_open(str(straight), "pt") as a, safe_open(str(resumed), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


def test_lora_needs_init(tmp_path):
    with pytest.raises(ValueError, match="--init"):
        run_train(_parse(["train", "lora", "--data", "shapes", "--out", str(tmp_path)]))
