"""One model worker fed by a bounded FIFO queue: requests wait their turn, and /progress reads what the running job
reports at every step (A1111's shared.state, for one job at a time).

The worker runs in the process's main thread and the HTTP server in another (server/cli.py), because PyTorch's
OpenMP kernels run slower when called from any other thread: the built-in model's 20-step 64x64 txt2img took
1.5-1.8 s in a second thread against 0.5-0.8 s in the main thread (2 threads; 1 thread showed no difference), and a
thread's malloc arena cannot keep large blocks (sdtorch/memory.py).

Interrupt and skip are flags the worker's step callback reads: the running job stops after its current step, and no
other job can be hit by a stop meant for this one. Skip stops the current batch of an n_iter job and goes on with the
next, interrupt stops the job; either way the answer carries the images finished so far (A1111 also returns the
partly denoised batch; here it is dropped).
"""
from __future__ import annotations

import datetime
import gc
import queue
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from PIL import Image

from .checkpoints import Checkpoint
from .preview import Previewer


class ServerStopping(Exception):
    """Handed to the request whose job was running when the server was stopped (Ctrl-C)."""


class JobStopped(Exception):
    """Raised from the step callback when the running job was interrupted, skipped or abandoned by its client."""


@dataclass
class Job:
    kind: str  # "txt2img", "img2img", "inpaint" or "load"
    checkpoint: Checkpoint
    prompt: str = ""
    kwargs: dict = field(default_factory=dict)  # the pipeline's keyword arguments (mapping.generation_kwargs)
    seed: int = 0
    n_iter: int = 1
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    save_to: str | None = None  # a folder, when the request asked save_images
    future: Future = field(default_factory=Future)
    abandoned: bool = False  # the client went away: stop at the next step

    @property
    def steps(self) -> int:
        return self.kwargs.get("steps", 0)


@dataclass
class Result:
    images: list
    model_name: str
    model_hash: str | None
    timestamp: str
    seconds: float


@dataclass
class Progress:
    """What /progress reports: A1111's state dict, plus the latest latent for the preview."""
    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    skipped: bool = False
    interrupted: bool = False
    job_timestamp: str = "0"
    time_start: float = 0.0
    latest: tuple | None = None  # (latents of the first image, σ) of the last finished step

    def as_a1111(self) -> dict:
        return {"skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": False,
                "job": self.job, "job_count": self.job_count, "job_timestamp": self.job_timestamp,
                "job_no": self.job_no, "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}

    def fraction(self) -> float:
        """A1111's progress: 0.01 + finished batches + the running batch's share of steps, at most 1."""
        count = self.job_count or 1  # read while the worker may be resetting it
        done = 0.01 + self.job_no / count
        if self.sampling_steps:
            done += self.sampling_step / self.sampling_steps / count
        return min(done, 1.0)


class Worker:
    def __init__(self, *, device="auto", dtype=None, max_queue: int = 16, weights: str | None = None):
        self.device, self.dtype, self.weights = device, dtype, weights
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.progress = Progress()
        self.pipe = None
        self.checkpoint: Checkpoint | None = None
        self.previewer: Previewer | None = None
        self.resolution = 512  # the loaded model's native size, the default width and height
        self.seconds_per_job = 1.0  # running mean, for Retry-After

    # -- the request side ----------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        """Queue a job (queue.Full when the queue is full) and return its future."""
        self.queue.put_nowait(job)
        return job.future

    def interrupt(self) -> None:
        if self.progress.job:
            self.progress.interrupted = True

    def skip(self) -> None:
        if self.progress.job:
            self.progress.skipped = True

    def retry_after(self) -> int:
        return max(1, round(self.queue.qsize() * self.seconds_per_job))

    # -- the worker thread ---------------------------------------------------------------------------------------
    def load(self, checkpoint: Checkpoint) -> None:
        """Make `checkpoint` the loaded model (only from the worker thread, or before start)."""
        import sdtorch

        if self.checkpoint is not None and self.checkpoint.path == checkpoint.path:
            return
        self.pipe = self.previewer = self.checkpoint = None
        gc.collect()  # one model in memory at a time
        # the server owns its process, as the command line does: glibc may keep freed blocks (sdtorch.memory)
        pipe = sdtorch.load(checkpoint.path, device=self.device, dtype=self.dtype, tune_allocator=True,
                            weights=self.weights)
        checkpoint.hash = pipe.model_hash
        self.pipe, self.checkpoint, self.previewer = pipe, checkpoint, Previewer(pipe)
        self.resolution = pipe.config.resolution

    def run(self, keep_going=lambda: True) -> None:
        """Run the queued jobs, in this thread (the main one: see the module's text), until `keep_going()` turns
        false (checked every second while the queue is empty)."""
        while True:
            try:
                job = self.queue.get(timeout=1.0)
            except queue.Empty:
                if not keep_going():
                    return
                continue
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(self._run(job))
            except KeyboardInterrupt:  # Ctrl-C during a job stops the server; its request is told why
                job.future.set_exception(ServerStopping("the server is stopping; the job was not finished"))
                raise
            except BaseException as e:  # noqa: BLE001 — handed to the waiting request
                job.future.set_exception(e)

    def _run(self, job: Job):
        self.load(job.checkpoint)
        if job.kind == "load":
            return None
        p, start = self.progress, time.perf_counter()
        p.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        p.job_count, p.job_no, p.sampling_step, p.sampling_steps = job.n_iter, 0, 0, job.steps
        p.skipped = p.interrupted = False
        p.latest, p.time_start, p.job = None, time.time(), job.kind
        images = []
        try:
            for i in range(job.n_iter):
                if p.interrupted or job.abandoned:
                    break
                p.job_no, p.skipped, p.sampling_step = i, False, 0
                try:
                    batch = self._generate(job, job.seed + i * job.kwargs["batch"])
                except JobStopped:
                    if p.skipped and not (p.interrupted or job.abandoned):
                        continue
                    break
                if job.save_to:
                    self._save(batch, job.save_to)
                images += batch
        finally:
            p.job, p.job_count, p.latest = "", 0, None
        seconds = time.perf_counter() - start
        self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * seconds
        return Result(images, self.pipe.name, self.checkpoint.hash, p.job_timestamp, seconds)

    def _generate(self, job: Job, seed: int) -> list:
        p = self.progress

        def on_step(step, total, latents, sigma):
            p.sampling_step, p.sampling_steps = step, total
            p.latest = (latents[:1].detach().clone(), float(sigma))
            if p.interrupted or p.skipped or job.abandoned:
                raise JobStopped

        kwargs = dict(job.kwargs, seed=seed, callback=on_step)
        if job.kind == "inpaint":
            return self.pipe.inpaint(job.prompt, job.init_image, job.mask, **kwargs)
        if job.kind == "img2img":
            return self.pipe.img2img(job.prompt, job.init_image, **kwargs)
        return self.pipe.txt2img(job.prompt, **kwargs)

    @staticmethod
    def _save(images: list, folder: str) -> None:
        """A1111's numbering: NNNNN-SEED.png after the highest number already in the folder."""
        from ..cli import output_paths
        from ..metadata import params_to_kwargs, parse_parameters, save_png

        seed = params_to_kwargs(parse_parameters(images[0].info["parameters"])[2])["seed"]
        for image, path in zip(images, output_paths(folder, len(images), seed), strict=True):
            save_png(image, path, image.info["parameters"])

    def preview_png(self) -> bytes | None:
        """The running step's preview (preview.py), or None when nothing runs."""
        latest, previewer = self.progress.latest, self.previewer
        if latest is None or previewer is None:
            return None
        return previewer.png(*latest)

