"""The training loop the three objectives share: AdamW with warmup + cosine decay, gradient clipping, EMA, mixed
precision, DistributedDataParallel, crash-safe checkpoints with exact resume, and the logs and pictures of a run.

A run directory holds:
    checkpoints/step-00001000.pt   training state (torch.save of tensors and plain containers; weights_only loads)
    log.jsonl                      one record per log interval ({"kind": "train", ...}) and per evaluation ("eval")
    samples/step-00001000.png      sample grids (UNet) or reconstructions (VAE) for fixed held-out items
    loss.png                       the loss curve, drawn at the end (with matplotlib, the `plots` extra)
    model.safetensors              the final model, in the native single-file layout
Under torchrun every rank runs this loop on its slice of each global batch; only rank 0 writes.
Its helpers: checkpoints.py (checkpoint files, RNG states), optim.py (AdamW's groups, LR schedule, EMA), plots.py.
"""
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from .checkpoints import (atomic_file, checkpoint_path, list_checkpoints, remove_stale_temp_files, resolve_resume,
                          rng_state, set_rng_state)
from .data import ShardedBatchSampler, sample_seed
from .optim import EMA, param_groups, warmup_cosine
from .plots import image_grid, save_loss_plot

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
HOLDOUT_EPOCH = -1  # held-out items get the seeds of this (never trained) epoch: fixed across evaluations


@dataclass
class TrainConfig:
    """Hyperparameters and bookkeeping of one run (the model's own sizes live in ModelConfig)."""
    out_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 32  # global: split evenly across the processes
    lr: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine decays to lr·min_lr_ratio at the last step
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.0  # 0: no EMA
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (fp16 with a gradient scaler)
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 500
    sample_every: int = 500
    seed: int = 0
    workers: int = 0  # data-loader worker processes
    device: str = "auto"
    resume: str | None = None  # a checkpoint path, or "latest" in out_dir/checkpoints
    deterministic: bool = False  # deterministic GPU kernels: bitwise-repeatable CUDA runs and resumes, a bit slower
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "keep_checkpoints", "log_every", "eval_every",
                     "sample_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0, warmup_steps >= 0 and min_lr_ratio in [0, 1], got {self.lr}, "
                             f"{self.warmup_steps}, {self.min_lr_ratio}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.grad_clip < 0 or self.workers < 0:
            raise ValueError("grad_clip and workers must be non-negative")


TRAINING_STATE_KEYS = {"step", "model", "optimizer", "scheduler", "ema", "grad_scaler", "data", "world_size", "rng"}


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checks it between steps, writes a checkpoint and returns. After the first
    signal the default handlers are back, so a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = True
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, device: torch.device) -> bool:
        """True when any rank was signalled: all ranks must stop at the same step or the next collective hangs."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ---- the loop ------------------------------------------------------------------------------------------------------

def setup_distributed(device_name: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we started the process group). Under torchrun (WORLD_SIZE > 1) this joins
    the group: NCCL with one GPU per process, gloo on CPU. A group the caller already started is used as it is."""
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    started = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        started = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu" if device_name == "auto" else device_name)
    return rank, world, device, started


def _to_device(batch: dict, device: torch.device) -> dict:
    # seeds stay on the CPU: the per-sample generators are CPU generators
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k != "seed" else v for k, v in batch.items()}


def _mean_over_ranks(metrics: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    values = torch.stack([v.float().to(device) for v in metrics.values()])
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(metrics, values.tolist(), strict=True))


class Run:
    """One training run of `objective` on `train_items` (a data.TrainItems), evaluated on `holdout_items`."""

    def __init__(self, objective: nn.Module, train_items: Dataset, holdout_items: Dataset, collate, cfg: TrainConfig):
        cfg.validate()
        self.objective, self.train_items, self.holdout_items, self.collate, self.cfg = (
            objective, train_items, holdout_items, collate, cfg)
        self.out = Path(cfg.out_dir)
        self.rank, self.world, self.device, self._owns_group = setup_distributed(cfg.device)
        self.is_main = self.rank == 0
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 training needs a CUDA device; use bf16 or fp32")
        if cfg.deterministic:
            # On the CPU every run repeats bit for bit anyway. CUDA kernels that accumulate with atomics (some
            # convolution and attention backwards) and cuBLAS's split workspaces do not, unless told to.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first starts
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        objective.to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(objective, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
        self.scheduler = LambdaLR(self.optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.ema = EMA(objective, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.timers = {"data": 0.0, "compute": 0.0, "other": 0.0}

    # -- checkpoints --
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "grad_scaler": self.scaler.state_dict(),
            "data": self.sampler_state(self.step),
            "world_size": self.world,
            "train_config": json.dumps(asdict(self.cfg)),
        }

    def sampler_state(self, step: int) -> dict:
        return ShardedBatchSampler(len(self.train_items), self.cfg.batch_size, self.rank, self.world,
                                   self.cfg.seed).state(step)

    def save_checkpoint(self) -> None:
        """Write the training state of every rank (each has its own RNG states) from rank 0, then drop old files."""
        rng = [None] * self.world
        if dist.is_initialized():
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if not self.is_main:
            return
        state = self.state_dict()
        state["rng"] = rng
        with atomic_file(checkpoint_path(self.out, self.step)) as f:
            torch.save(state, f)  # streams into the file: no second in-memory copy of the state
        for old in list_checkpoints(self.out)[:-self.cfg.keep_checkpoints]:
            old.unlink()

    def load_checkpoint(self, path: Path) -> dict:
        """Restore everything but the RNGs; returns this rank's RNG states, to set once the data loader has started
        (starting it draws from the global RNG, as it did before the checkpoint was written)."""
        from ..checkpoint.formats import safe_torch_load

        state = safe_torch_load(path)  # weights only; a damaged or hostile file is one error naming it
        if not isinstance(state, dict) or not state.keys() >= TRAINING_STATE_KEYS:
            raise ValueError(f"{path} is not a training checkpoint of `sdtorch train` (no step, optimizer, ... "
                             "state); to fine-tune a model, pass it as --init")
        try:
            self.objective.load_state_dict(state["model"])
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: its model does not fit this run's ({str(e).splitlines()[0]})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError(f"{path} has no EMA weights; resume without --ema-decay or start a new run")
            self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["grad_scaler"])
        self.step = state["step"]
        if state["data"] != self.sampler_state(self.step):
            raise ValueError(f"{path} was written with another data set, batch size or seed: {state['data']}")
        # With another world size the ranks' RNGs cannot all be carried over; the data order still can.
        return state["rng"][self.rank] if state["world_size"] == self.world else state["rng"][0]

    # -- logging --
    def log(self, record: dict) -> None:
        """Append one line, in one write. After a torn last line (a kill mid-write) it starts on a line of its own,
        so only the torn line is lost, never the record after it."""
        if self.is_main:
            with open(self.out / "log.jsonl", "a+b") as f:
                end, torn = f.seek(0, os.SEEK_END), False
                if end:
                    f.seek(end - 1)
                    torn = f.read(1) != b"\n"
                f.write(b"\n" * torn + (json.dumps(record) + "\n").encode())

    def read_log(self) -> list[dict]:
        """The log's records. A line cut short by a kill (or otherwise unreadable) is left out with a warning that
        names it, never stops a resume."""
        path = self.out / "log.jsonl"
        if not path.is_file():
            return []
        records = []
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            elif line.strip():
                warnings.warn(f"{path}:{n}: not a log record (a write cut short?); left out", stacklevel=2)
        return records

    def truncate_log(self) -> None:
        """On resume, drop the records of steps after the checkpoint: they are about to be redone."""
        if self.is_main:
            kept = [r for r in self.read_log() if r["step"] <= self.step]
            with atomic_file(self.out / "log.jsonl") as f:
                f.write("".join(json.dumps(r) + "\n" for r in kept).encode())

    def holdout_batches(self):
        """The held-out items in fixed order with fixed seeds, collated, on the device."""
        keys = [(i, sample_seed(self.cfg.seed, HOLDOUT_EPOCH, i)) for i in range(len(self.holdout_items))]
        for start in range(0, len(keys), self.cfg.batch_size):
            items = [self.holdout_items[key] for key in keys[start:start + self.cfg.batch_size]]
            yield _to_device(self.collate(items), self.device)

    def evaluate_and_preview(self, evaluate: bool, preview: bool) -> None:
        """Held-out metrics and a picture, on rank 0 with the EMA weights (what will be exported)."""
        if self.is_main and len(self.holdout_items):
            self.objective.eval()
            with self.ema.applied(self.objective) if self.ema else nullcontext(), torch.no_grad():
                if evaluate:
                    self.log({"kind": "eval", "step": self.step, **self.objective.evaluate(self.holdout_batches())})
                rows = self.objective.preview(next(self.holdout_batches())) if preview else None
                if rows is not None:
                    (self.out / "samples").mkdir(exist_ok=True)
                    image_grid(rows).save(self.out / "samples" / f"step-{self.step:08d}.png")
            self.objective.train()
        if dist.is_initialized():
            dist.barrier()

    # -- training --
    def train_step(self, model: nn.Module, batch: dict, autocast, params: list) -> tuple[dict, float]:
        """One optimizer step: forward, backward, clip, AdamW, LR schedule, EMA. Returns (metrics, lr used)."""
        cfg = self.cfg
        with autocast:
            loss, metrics = model(batch)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.objective, self.step)
        self.step += 1
        return {**metrics, "grad_norm": grad_norm.detach()}, lr

    def log_interval(self, pending: list[dict], lr: float, elapsed: float, data_wait: float) -> dict:
        """Average the interval's metrics over its steps and the ranks, and log them with the throughput."""
        means = _mean_over_ranks({k: torch.stack([m[k] for m in pending]).mean() for k in pending[0]}, self.device)
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(f"the loss is {means['loss']} at step {self.step}: lower the learning rate, "
                                     "or use bf16/fp32 instead of fp16")
        self.log({"kind": "train", "step": self.step, **means, "lr": lr,
                  "samples_per_s": len(pending) * self.cfg.batch_size / elapsed, "data_share": data_wait / elapsed})
        return means

    def train(self) -> dict:
        """Train to cfg.steps (or until SIGINT/SIGTERM), then evaluate and export. Returns a summary."""
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for folder in (self.out, self.out / "checkpoints"):
                remove_stale_temp_files(folder)
        resumed_rng = None
        if cfg.resume:
            path = resolve_resume(cfg.resume, self.out)
            if path is not None:
                resumed_rng = self.load_checkpoint(path)
                self.truncate_log()
            elif self.is_main:
                print(f"no checkpoint in {self.out / 'checkpoints'} yet: starting a new run")
        model = self.objective
        if self.world > 1:
            model = DistributedDataParallel(self.objective, device_ids=[self.device.index] if
                                            self.device.type == "cuda" else None, broadcast_buffers=False)
        sampler = ShardedBatchSampler(len(self.train_items), cfg.batch_size, self.rank, self.world, cfg.seed,
                                      start_step=self.step)
        loader = DataLoader(self.train_items, batch_sampler=sampler, collate_fn=self.collate,
                            num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=cfg.workers > 0)
        autocast = torch.autocast(self.device.type, dtype=PRECISIONS[cfg.precision],
                                  enabled=cfg.precision != "fp32")
        params = [p for p in self.objective.parameters() if p.requires_grad]
        bar = None
        if self.is_main and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True)
        self.objective.train()
        interrupted, pending, run_start = False, [], time.perf_counter()
        interval_start, interval_data = run_start, 0.0
        with StopRequest() as stop:
            batches = iter(loader)
            if resumed_rng is not None:
                set_rng_state(resumed_rng)
            while self.step < cfg.steps:
                if stop.agreed(self.device):
                    interrupted = True
                    break
                t0 = time.perf_counter()
                batch = _to_device(next(batches), self.device)
                t1 = time.perf_counter()
                metrics, lr = self.train_step(model, batch, autocast, params)
                pending.append(metrics)
                logging = self.step % cfg.log_every == 0 or self.step == cfg.steps
                if logging and self.device.type == "cuda":
                    torch.cuda.synchronize()  # so the timers count finished GPU work
                t2 = time.perf_counter()
                self.timers["data"] += t1 - t0
                self.timers["compute"] += t2 - t1
                interval_data += t1 - t0
                if bar is not None:
                    bar.update(1)
                if logging:
                    means = self.log_interval(pending, lr, t2 - interval_start, interval_data)
                    if bar is not None:
                        bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}")
                if self.step % cfg.eval_every == 0 or self.step % cfg.sample_every == 0:
                    self.evaluate_and_preview(self.step % cfg.eval_every == 0, self.step % cfg.sample_every == 0)
                if self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
                t3 = time.perf_counter()
                self.timers["other"] += t3 - t2
                if logging:  # the next interval starts now: evaluations and checkpoints don't count against it
                    pending, interval_start, interval_data = [], t3, 0.0
                else:
                    interval_start += t3 - t2
            if interrupted or self.step % cfg.ckpt_every:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return self.finish(interrupted, time.perf_counter() - run_start)

    def finish(self, interrupted: bool, wall: float) -> dict:
        """Final evaluation, samples and export (unless interrupted), the loss curve, and a summary."""
        export = None
        if not interrupted and self.step == self.cfg.steps:
            # the loop already evaluated (or drew) at this step if it fell on an interval
            self.evaluate_and_preview(self.step % self.cfg.eval_every != 0, self.step % self.cfg.sample_every != 0)
            if self.is_main:
                export = self.out / "model.safetensors"
                with self.ema.applied(self.objective) if self.ema else nullcontext():
                    self.objective.export(export)
        records = self.read_log() if self.is_main else []
        if any(r["kind"] == "train" for r in records) and not save_loss_plot(records, self.out / "loss.png"):
            print("no loss.png: matplotlib is not installed (pip install matplotlib); the losses are in "
                  "log.jsonl", file=sys.stderr)
        evals = [r for r in records if r["kind"] == "eval"]
        timed = sum(self.timers.values()) or 1.0
        summary = {"rank": self.rank, "step": self.step, "interrupted": interrupted,
                   "export": str(export) if export else None,
                   "eval": evals[-1] if evals else None, "wall_s": wall,
                   "data_share": self.timers["data"] / timed, "other_share": self.timers["other"] / timed}
        if self._owns_group:
            dist.destroy_process_group()
        return summary


def train(objective: nn.Module, train_items: Dataset, holdout_items: Dataset, collate, cfg: TrainConfig) -> dict:
    """Run the training loop (see `Run`); returns {"rank", "step", "interrupted", "export", "eval", "wall_s",
    "data_share", "other_share"}."""
    return Run(objective, train_items, holdout_items, collate, cfg).train()
