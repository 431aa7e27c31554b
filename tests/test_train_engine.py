"""The engine end to end, on tiny models and 32x32 shapes: every trainer learns and writes its files; a run stopped
by SIGINT and then killed with SIGKILL resumes to exactly the uninterrupted run; two gloo processes match one."""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import sdtorch
from sdtorch.config import CLIPTextConfig, ModelConfig, VAEConfig
from sdtorch.models import AutoencoderKL, CLIPTextModel
from sdtorch.train.cli import TINY, add_train_parser, model_settings, run_train
from sdtorch.train.checkpoints import atomic_file, list_checkpoints, resolve_resume
from sdtorch.train.optim import EMA, warmup_cosine
from sdtorch.train.plots import image_grid, save_loss_plot, smooth
from sdtorch.train.objectives import load_parts, save_parts

ROOT = Path(__file__).resolve().parent.parent
SMALL = {  # --set overrides: every part small enough for a CPU step in tens of milliseconds
    "clip": ["clip.hidden_size=32", "clip.intermediate_size=64", "clip.num_hidden_layers=2",
             "clip.num_attention_heads=2", "clip.max_position_embeddings=32", "vision.patch_size=8"],
    "vae": ["vae.ch=16", "vae.ch_mult=[1,1,2,2]", "vae.norm_groups=8"],
    "unet": ["unet.model_channels=32", "unet.channel_mult=[1,2]", "unet.attention_resolutions=[2]",
             "unet.num_heads=2", "unet.norm_groups=8"],
}
TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=32)
VAE = VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), norm_groups=8, scale_factor=0.5)


def _args(kind: str, out: Path, *extra: str, steps: int = 12, batch: int = 8, data_size: int = 64) -> list[str]:
    args = ["train", kind, "--data", "shapes", "--data-size", str(data_size), "--resolution", "32",
            "--holdout", "8", "--out", str(out), "--steps", str(steps), "--batch-size", str(batch),
            "--warmup-steps", "2", "--log-every", "1", "--quiet"]
    for item in SMALL[kind]:
        args += ["--set", item]
    return args + list(extra)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _eval(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread here and in the subprocesses: the runs compared bit for bit must use the same thread count,
    and on a shared 2-core machine two spinning OpenMP threads make these tiny ops 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def frozen_parts(tmp_path_factory) -> list[str]:
    """--clip and --vae files for the UNet trainer: small random CLIP and VAE in the export format."""
    folder = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    save_parts(folder / "clip.safetensors", ModelConfig(clip=TEXT), {"text_encoder": CLIPTextModel(TEXT)})
    save_parts(folder / "vae.safetensors", ModelConfig(vae=VAE), {"vae": AutoencoderKL(VAE)})
    return ["--clip", str(folder / "clip.safetensors"), "--vae", str(folder / "vae.safetensors")]


# ---- each trainer --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,extra", [
    ("clip", ["--lr", "2e-3", "--data-size", "16", "--workers", "2"]),
    ("vae", ["--lr", "2e-3", "--data-size", "16"]),
    ("unet", ["--lr", "2e-3", "--data-size", "16", "--min-snr-gamma", "5", "--sample-every", "10"]),
])
def test_trainer_learns_and_writes_its_files(kind, extra, tmp_path, frozen_parts):
    """On 16 items (2 batches an epoch) every loss falls within 20 steps; the run leaves its log, curve, pictures,
    checkpoints and the exported model, which loads back."""
    out = tmp_path / kind
    argv = _args(kind, out, *extra, steps=20) + (frozen_parts if kind == "unet" else [])
    assert run_train(_parse(argv)) == 0
    losses = list(_losses(out).values())
    assert len(losses) == 20
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
    assert [p.name for p in list_checkpoints(out)] == ["step-00000020.pt"]
    assert Image.open(out / "loss.png").size == (640, 360)
    assert _eval(out)[-1]["step"] == 20
    if kind == "clip":
        config, parts = load_parts(out / "model.safetensors")
        assert list(parts) == ["text_encoder"] and config.clip.hidden_size == 32
        assert 0.0 <= _eval(out)[-1]["retrieval_top1"] <= 1.0
    if kind == "vae":
        config, parts = load_parts(out / "model.safetensors")
        assert list(parts) == ["vae"]
        assert config.vae.scale_factor == pytest.approx(_eval(out)[-1]["scale_factor"])
        assert _eval(out)[-1]["psnr"] > 5.0
        assert Image.open(out / "samples" / "step-00000020.png").size == (8 * 32, 2 * 32)
    if kind == "unet":
        assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000010.png", "step-00000020.png"]
        pipe = sdtorch.load(out / "model.safetensors", device="cpu")
        state = torch.load(out / "checkpoints" / "step-00000020.pt", weights_only=True)
        for name, value in pipe.unet.state_dict().items():  # the export is the EMA UNet
            assert torch.equal(value, state["ema"]["models.model.diffusion_model." + name])


def test_config_file_then_set_flags_override_the_tiny_sizes(tmp_path):
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"unet": {"model_channels": 96, "num_heads": 8}, "vision": {"patch_size": 4}}))
    args = _parse(["train", "clip", str(config), "--data", "shapes", "--set", "unet.num_heads=2",
                   "--set", "prediction_type=v_prediction", "--set", "vision.hidden_size=64"])
    settings, vision = model_settings(args)
    cfg = ModelConfig.from_dict(settings)
    assert (cfg.unet.model_channels, cfg.unet.num_heads, cfg.prediction_type) == (96, 2, "v_prediction")
    assert cfg.unet.channel_mult == TINY.unet.channel_mult and vision == {"patch_size": 4, "hidden_size": 64}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        model_settings(_parse(["train", "vae", "--data", "shapes", "--set", "vae.ch"]))


def test_init_fine_tunes_a_whole_checkpoint(tmp_path):
    """--init: an SD-layout checkpoint's UNet is trained further; its text encoder and VAE ride along, unchanged."""
    from conftest import TINY as SD_SHAPED, tiny_models
    from sdtorch.checkpoint import save_checkpoint

    base = tiny_models(SD_SHAPED)
    save_checkpoint(base, tmp_path / "base.safetensors")
    argv = ["train", "unet", "--data", "shapes", "--data-size", "16", "--resolution", "32", "--holdout", "4",
            "--out", str(tmp_path / "tune"), "--steps", "2", "--batch-size", "4", "--quiet", "--ema-decay", "0",
            "--init", str(tmp_path / "base.safetensors"), "--prediction-type", "v_prediction"]
    assert run_train(_parse(argv)) == 0
    tuned = sdtorch.load(tmp_path / "tune" / "model.safetensors", device="cpu")
    assert tuned.config.prediction_type == "v_prediction" and tuned.config.unet == SD_SHAPED.unet
    for part in ("vae", "text_encoder"):
        assert all(torch.equal(v, getattr(base, part).state_dict()[k])
                   for k, v in getattr(tuned.models, part).state_dict().items())
    assert not torch.equal(tuned.unet.out[2].weight, base.unet.out[2].weight)


def test_vae_decoder_only_fine_tune_keeps_the_encoder_and_scale(tmp_path, frozen_parts):
    """`train vae --init FILE --decoder-only`: the decoder learns; encoder, latent scale and config stay the file's."""
    base = Path(frozen_parts[3])  # the --vae file
    out = tmp_path / "ft"
    argv = _args("vae", out, "--lr", "2e-3", "--data-size", "16", "--init", str(base), "--decoder-only",
                 "--cache-encodings", "16", steps=4)
    assert run_train(_parse(argv)) == 0
    (base_cfg, base_parts), (cfg, parts) = load_parts(base), load_parts(out / "model.safetensors")
    assert cfg.vae == base_cfg.vae
    changed = {k for k, v in parts["vae"].items() if not torch.equal(v, base_parts["vae"][k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    with pytest.raises(ValueError, match="holds no VAE"):
        run_train(_parse(_args("vae", tmp_path / "x", "--init", frozen_parts[1], steps=1)))


def test_unet_trainer_needs_clip_and_vae(tmp_path):
    with pytest.raises(ValueError, match="needs a trained text_encoder and vae"):
        run_train(_parse(_args("unet", tmp_path)))


# ---- crash safety --------------------------------------------------------------------------------------------------

SIGNALLING_RUN = textwrap.dedent("""
    import os, signal, sys
    from sdtorch.train import cli

    at_call, signame = int(sys.argv[1]), sys.argv[2]
    build = cli.build_objective

    def build_and_signal(args):
        objective, collate = build(args)
        forward, calls = objective.forward, [0]

        def forward_then_signal(batch):  # the signal lands in the middle of a training step
            calls[0] += 1
            if calls[0] == at_call:
                os.kill(os.getpid(), getattr(signal, signame))
            return forward(batch)

        objective.forward = forward_then_signal
        return objective, collate

    cli.build_objective = build_and_signal
    import argparse
    parser = argparse.ArgumentParser()
    cli.add_train_parser(parser.add_subparsers(dest="command"))
    sys.exit(cli.run_train(parser.parse_args(sys.argv[3:])))
""")


def _signalling_run(tmp_path: Path, at_call: int, signame: str, argv: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "signalling_run.py"
    script.write_text(SIGNALLING_RUN)
    return subprocess.run([sys.executable, str(script), str(at_call), signame, *argv], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def test_resume_after_sigint_and_kill9_equals_the_uninterrupted_run(tmp_path, frozen_parts):
    args = _args("unet", tmp_path / "run", "--ckpt-every", "4", "--resume", "latest", *frozen_parts)
    # 1. Ctrl-C during step 6: the step finishes, a checkpoint of step 6 is written, exit code 0
    first = _signalling_run(tmp_path, 6, "SIGINT", args)
    assert first.returncode == 0, first.stderr
    assert "interrupted at step 6" in first.stdout
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000004.pt", "step-00000006.pt"]
    # 2. resumed, then kill -9 during step 10 (its 4th): steps 7-9 are logged, the last checkpoint is step 8
    second = _signalling_run(tmp_path, 4, "SIGKILL", args)
    assert second.returncode == -signal.SIGKILL
    assert max(_losses(tmp_path / "run")) == 9
    (tmp_path / "run" / "checkpoints" / ".step-00000012.pt.tmp-1").write_bytes(b"half a checkpoint")
    assert resolve_resume("latest", tmp_path / "run").name == "step-00000008.pt"
    # 3. resumed again from step 8 to the end, in this process
    assert run_train(_parse(args)) == 0
    # the same run without interruptions
    assert run_train(_parse(_args("unet", tmp_path / "whole", "--ckpt-every", "4", *frozen_parts))) == 0

    assert _losses(tmp_path / "run") == _losses(tmp_path / "whole")  # every step's loss, exactly
    assert len(_losses(tmp_path / "whole")) == 12
    resumed = torch.load(list_checkpoints(tmp_path / "run")[-1], weights_only=True)
    whole = torch.load(list_checkpoints(tmp_path / "whole")[-1], weights_only=True)
    for part in ("model", "ema"):
        assert resumed[part].keys() == whole[part].keys()
        assert all(torch.equal(resumed[part][k], whole[part][k]) for k in whole[part])
    assert resumed["optimizer"]["state"][0]["exp_avg_sq"].equal(whole["optimizer"]["state"][0]["exp_avg_sq"])
    assert resumed["rng"][0]["torch"].equal(whole["rng"][0]["torch"])


# ---- distributed ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["clip", "unet"])
def test_two_gloo_processes_match_one_process(kind, tmp_path, frozen_parts):
    """torchrun's environment, by hand: 2 ranks with 4 samples each = 1 process with the global batch of 8. CLIP's
    negatives span both ranks (gathered with gradient); the UNet's noise comes from the per-sample seeds."""
    extra = ["--ckpt-every", "3", "--lr", "1e-3"] + (frozen_parts if kind == "unet" else [])
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "sdtorch.cli", *_args(kind, tmp_path / "ddp", *extra,
                                       steps=3)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert run_train(_parse(_args(kind, tmp_path / "one", *extra, steps=3))) == 0

    ddp = torch.load(list_checkpoints(tmp_path / "ddp")[-1], weights_only=True)
    one = torch.load(list_checkpoints(tmp_path / "one")[-1], weights_only=True)
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    # Float tolerance: the ranks' gradients are averaged in another order than one process sums them (~1e-7
    # relative), and three Adam steps of lr 1e-3 keep almost every weight within 1e-6. Adam divides each element's
    # step by that element's own gradient size, though, so where an exact gradient nearly cancels over the batch the
    # rounding of the other reduction order (2 ranks x 4 samples vs 1 x 8, which oneDNN blocks differently) becomes
    # a visible part of the step: measured max 2e-6 on an AVX2 EPYC, 3.9e-5 (a UNet conv) on an AVX-512 Xeon. So: the
    # mean within 1e-6, every weight within 1e-4 = a tenth of one step. The extreme case is CLIP's key biases:
    # softmax ignores a shift shared by all keys, so their exact gradient is 0 and the computed one is rounding
    # noise, which Adam normalizes into steps of up to lr: those may differ by up to 2·lr per step.
    noise_only = {k for k in one["model"] if k.endswith("self_attn.k_proj.bias")}
    diff = {k: (ddp["model"][k] - one["model"][k]).abs().max().item() for k in one["model"]}
    assert max(v for k, v in diff.items() if k not in noise_only) < 1e-4
    mean = torch.cat([(ddp["model"][k] - one["model"][k]).abs().flatten() for k in one["model"] if k not in noise_only])
    assert mean.mean().item() < 1e-6
    assert max((diff[k] for k in noise_only), default=0.0) < 2 * 1e-3 * 3
    if kind == "unet":
        # the EMA follows the weights, so the same bound
        assert max((ddp["ema"][k] - one["ema"][k]).abs().max().item() for k in one["ema"]) < 1e-4
    ddp_losses, one_losses = _losses(tmp_path / "ddp"), _losses(tmp_path / "one")
    assert all(abs(ddp_losses[s] - one_losses[s]) <= 1e-5 * abs(one_losses[s]) for s in one_losses)


# ---- pieces --------------------------------------------------------------------------------------------------------

def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_ema_warms_up_and_swaps_weights_in_and_out():
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = EMA(module, decay=0.99)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update(module, step=0)  # decay min(0.99, 1/10) = 0.1: the EMA moves 90% of the way
    assert ema.shadow["weight"].item() == pytest.approx(0.9)
    with ema.applied(module):
        assert module.weight.item() == pytest.approx(0.9)
    assert module.weight.item() == 1.0


def test_atomic_file_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"new, half")
        raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
    with atomic_file(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(ValueError, match="no checkpoint"):
        resolve_resume(str(tmp_path / "missing.pt"), tmp_path)
    assert resolve_resume("latest", tmp_path) is None


def test_pictures(tmp_path):
    grid = image_grid([-torch.ones(3, 3, 8, 8), torch.ones(2, 3, 8, 8)])
    assert grid.size == (24, 16) and grid.getpixel((0, 0)) == (0, 0, 0) and grid.getpixel((0, 8)) == (255, 255, 255)
    records = [{"kind": "train", "step": s, "loss": 1 / s} for s in range(1, 101)] + [{"kind": "eval", "step": 50,
                                                                                       "loss": 0.02}]
    assert save_loss_plot(records, tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as curve:
        assert curve.size == (640, 360) and len(curve.convert("RGB").getcolors(maxcolors=1 << 16)) > 3  # drawn


def test_the_smoothed_loss_tracks_the_data():
    """The centered average has no lag: a straight line (a steadily falling loss) comes out unchanged, to its ends,
    while noise around it shrinks by about the square root of the window."""
    line = torch.linspace(2.0, 1.0, 200, dtype=torch.float64).numpy()
    assert abs(smooth(line, 11) - line).max() < 1e-12
    noise = torch.randn(200, generator=torch.Generator().manual_seed(0)).double().numpy()
    assert (smooth(line + noise, 11) - line)[5:-5].std() < 0.45 * noise.std()  # 1/sqrt(11) = 0.30
