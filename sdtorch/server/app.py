"""The ASGI app: A1111's /sdapi/v1 routes and the web page, in front of one Worker.

Every route answers JSON; bad input is a 4xx naming the field ({"detail": [{"loc": [...], "msg": ...}]}, as FastAPI
and A1111 answer a validation error), and an unexpected failure is a 500 without a traceback (that goes to the log).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import queue
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from ..diffusion.samplers import SAMPLERS, SCHEDULES
from ..metadata import parse_parameters
from ..pipeline import SCHEDULE_LABELS
from . import mapping
from .checkpoints import Checkpoints
from .mapping import FieldError
from .schemas import Img2ImgRequest, PNGInfoRequest, Txt2ImgRequest
from .worker import Job, ServerStopping, Worker

log = logging.getLogger("sdtorch.serve")
STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"/": ("index.html", "text/html"), "/page.js": ("page.js", "text/javascript")}


@dataclass
class ServerConfig:
    models_dir: str | None = None
    outdir: str = "outputs"
    max_pixels: int = 2048 * 2048
    api_auth: str | None = None  # "user:pass[,user2:pass2]"
    cors_allow_origins: str | None = None
    flags: dict | None = None  # what /cmd-flags reports

    @property
    def max_body(self) -> int:
        """Bytes a request may send: an init image and a mask of --max-pixels RGBA pixels in base64, and 1 MiB."""
        return 2 * self.max_pixels * 4 * 4 // 3 + 2 ** 20


# -- middleware (plain ASGI: they run on every request, so they stay cheap) -------------------------------------------
def parse_credentials(text: str) -> dict[str, str]:
    credentials = {}
    for pair in text.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user:
            raise ValueError(f"--api-auth wants user:password[,user2:password2], got {pair!r}")
        credentials[user] = password
    return credentials


class BasicAuth:
    """HTTP Basic on every route (A1111's --api-auth), compared in constant time against every user."""

    def __init__(self, app, credentials: dict[str, str]):
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials.items()]

    def allowed(self, header: bytes | None) -> bool:
        if not header or header[:6].lower() != b"basic ":
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        ok = False
        for u, p in self.credentials:  # no early exit: the time does not depend on which user matched
            ok |= secrets.compare_digest(user, u) & secrets.compare_digest(password, p)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.allowed(dict(scope["headers"]).get(b"authorization")):
            response = JSONResponse({"detail": "Incorrect username or password"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="sdtorch"'})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _TooLarge(HTTPException):
    """Raised from receive(): FastAPI lets an HTTPException through its body parsing (any other error becomes 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyLimit:
    """413 for a body larger than `limit` bytes, by its Content-Length or, when chunked, as it arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_large = JSONResponse({"detail": f"request body larger than {self.limit} bytes"}, status_code=413)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_large(scope, receive, send)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge(self.limit)
            return message

        async def watching_send(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)


# -- the app ----------------------------------------------------------------------------------------------------------
def build_app(worker: Worker, checkpoints: Checkpoints, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="sdtorch", docs_url=None, redoc_url=None)
    options: dict[str, Any] = {"sd_model_checkpoint": worker.checkpoint.title, "CLIP_stop_at_last_layers": 1,
                               "sd_vae": "Automatic", "samples_format": "png", "outdir_samples": config.outdir,
                               "live_previews_enable": True, "show_progress_every_n_steps": 1,
                               "s_min_uncond": 0.0, "s_min_uncond_all": False, "token_merging_ratio": 0.0,
                               "token_merging_ratio_hr": 0.0}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        # FastAPI's shape without "input": no echo of a 20 MB image or a 100k-character prompt
        errors = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
                  for err in e.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(FieldError)
    async def field_error(request: Request, e: FieldError):
        return JSONResponse({"detail": e.detail()}, status_code=e.status)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("error in %s %s", request.method, request.url.path)
        return JSONResponse({"error": type(e).__name__, "detail": "internal error; see the server's log"},
                            status_code=500)

    def page(path: str, name: str, media_type: str):
        async def serve_file():
            return FileResponse(STATIC / name, media_type=media_type, headers={"Cache-Control": "no-cache"})
        app.add_api_route(path, serve_file, methods=["GET"], include_in_schema=False)

    for path, (name, media_type) in PAGE_FILES.items():
        page(path, name, media_type)

    # -- queue --------------------------------------------------------------------------------------------------
    async def run(job: Job, request: Request):
        """Queue the job and wait for it; a client that goes away abandons its job (dropped, or stopped at a step)."""
        try:
            future = asyncio.wrap_future(worker.submit(job))
        except queue.Full:
            return JSONResponse({"detail": "the queue is full; retry later"}, status_code=503,
                                headers={"Retry-After": str(worker.retry_after())})
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.5)
            if done:
                try:
                    return future.result()
                except ValueError as e:  # the pipeline or the loader refused something (sdtorch's bad-input errors)
                    return JSONResponse({"detail": str(e)}, status_code=422)
                except ServerStopping as e:
                    return JSONResponse({"detail": str(e)}, status_code=503)
            if await request.is_disconnected():
                job.abandoned = True
                job.future.cancel()  # still queued: the worker skips it
                return Response(status_code=499)

    def checkpoint_named(name, field: str):
        if not isinstance(name, str):
            raise FieldError(field, "must be a model title (see /sdapi/v1/sd-models)")
        checkpoint = checkpoints.find(name)
        if checkpoint is None:
            raise FieldError(field, f"no model named {name!r} (see /sdapi/v1/sd-models)", status=404)
        return checkpoint

    # -- generation ---------------------------------------------------------------------------------------------
    async def generate(req, request: Request, kind: str):
        override = req.override_settings.get("sd_model_checkpoint")
        checkpoint = (checkpoint_named(override, "override_settings.sd_model_checkpoint") if override is not None
                      else checkpoint_named(options["sd_model_checkpoint"], "sd_model_checkpoint"))
        kwargs = mapping.generation_kwargs(req, options, worker.resolution, config.max_pixels)
        if req.refiner_checkpoint not in (None, "", "None", "none"):  # A1111's "no refiner" values
            refiner = checkpoint_named(req.refiner_checkpoint, "refiner_checkpoint")
            kwargs.update(refiner=str(refiner.path), refiner_switch_at=req.refiner_switch_at or 0.8)
        init = mask = None
        if kind == "img2img":
            if not req.init_images:
                raise FieldError("init_images", "img2img needs one init image")
            init = await run_in_threadpool(mapping.decode_image, req.init_images[0], "init_images.0",
                                           config.max_pixels)
            if req.mask:
                mask = await run_in_threadpool(mapping.decode_image, req.mask, "mask", config.max_pixels)
                mask = mapping.mask_from_a1111(mask, bool(req.inpainting_mask_invert))
                if req.inpainting_fill == 0:
                    init = await run_in_threadpool(mapping.fill_masked, init, mask)
                elif req.inpainting_fill > 1:
                    raise FieldError("inpainting_fill", "latent noise (2) and latent nothing (3) are not supported; "
                                                        "use 0 (fill) or 1 (original)")
                kind = "inpaint"
        seed = req.seed if req.seed != -1 else random.randrange(2 ** 32)
        subseed = req.subseed if req.subseed != -1 else random.randrange(2 ** 32)
        job = Job(kind, checkpoint, req.prompt, kwargs, seed, req.n_iter, init, mask,
                  config.outdir if req.save_images else None)
        result = await run(job, request)
        if isinstance(result, Response):
            return result
        if not req.override_settings_restore_afterwards:
            options.update({k: v for k, v in req.override_settings.items() if k in options})
        clip_skip = kwargs["clip_skip"]
        info = mapping.a1111_info(req, kwargs, seed, subseed, result.images, result.model_name, result.model_hash,
                                  result.timestamp, clip_skip)
        images = await run_in_threadpool(lambda: [mapping.encode_png(im) for im in result.images]) \
            if req.send_images else []
        parameters = req.model_dump()
        if kind != "txt2img" and not req.include_init_images:
            parameters["init_images"] = parameters["mask"] = None
        return {"images": images, "parameters": parameters, "info": info}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await generate(req, request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest, request: Request):
        return await generate(req, request, "img2img")

    # -- state --------------------------------------------------------------------------------------------------
    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        p = worker.progress
        if not p.job_count:
            return {"progress": 0, "eta_relative": 0, "state": p.as_a1111(), "current_image": None,
                    "textinfo": f"{worker.queue.qsize()} queued"}
        done = p.fraction()
        elapsed = max(0.0, time.time() - p.time_start)
        png = None if skip_current_image else worker.preview_png()
        return {"progress": done, "eta_relative": elapsed / done - elapsed, "state": p.as_a1111(),
                "current_image": base64.b64encode(png).decode() if png else None,
                "textinfo": f"step {p.sampling_step}/{p.sampling_steps}, {worker.queue.qsize()} queued"}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        worker.skip()
        return {}

    @app.get("/sdapi/v1/options")
    def get_options():
        checkpoint = checkpoints.find(options["sd_model_checkpoint"])
        title = checkpoint.as_a1111()["title"] if checkpoint else options["sd_model_checkpoint"]  # with its hash
        return {**options, "sd_model_checkpoint": title, "sd_checkpoint_hash": checkpoint.hash if checkpoint else None,
                "sdtorch_model_resolution": worker.resolution}  # the page's default size

    @app.post("/sdapi/v1/options")
    async def set_options(req: dict[str, Any], request: Request):
        if "CLIP_stop_at_last_layers" in req:
            clip_skip = req["CLIP_stop_at_last_layers"]
            if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= 12:
                raise FieldError("CLIP_stop_at_last_layers", f"must be an integer in 1..12, got {clip_skip!r}")
        updates = {k: v for k, v in req.items() if k in options}  # A1111 also ignores options it does not know
        if "sd_model_checkpoint" in req:
            checkpoint = checkpoint_named(req["sd_model_checkpoint"], "sd_model_checkpoint")
            result = await run(Job("load", checkpoint), request)  # in turn with the queued jobs, as A1111 does
            if isinstance(result, Response):
                return result
            updates["sd_model_checkpoint"] = checkpoint.title
        options.update(updates)
        return None

    # -- lists --------------------------------------------------------------------------------------------------
    @app.get("/sdapi/v1/samplers")
    def samplers():
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS.values()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        automatic = {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": None,
                     "need_inner_model": False}
        return [automatic] + [{"name": n, "label": SCHEDULE_LABELS.get(n, n), "aliases": None, "default_rho": None,
                               "need_inner_model": False} for n in SCHEDULES]

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return [c.as_a1111() for c in checkpoints.items.values()]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        checkpoints.refresh()
        return None

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags():
        return config.flags or {}

    @app.get("/internal/ping")
    def ping():
        return {}

    for path, value in {"sd-vae": [], "upscalers": [], "latent-upscale-modes": [], "hypernetworks": [],
                        "face-restorers": [], "realesrgan-models": [], "prompt-styles": [], "loras": [],
                        "extensions": [], "embeddings": {"loaded": {}, "skipped": {}},
                        "scripts": {"txt2img": [], "img2img": []}}.items():
        app.add_api_route(f"/sdapi/v1/{path}", lambda value=value: value, methods=["GET"])

    @app.post("/sdapi/v1/png-info")
    async def png_info(req: PNGInfoRequest):
        image = await run_in_threadpool(mapping.decode_image, req.image, "image", config.max_pixels)
        text = image.info.get("parameters") or ""
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
        parameters = {}
        if text:
            prompt, negative, fields = parse_parameters(text)
            parameters = {"Prompt": prompt, "Negative prompt": negative}
            for key, value in fields.items():
                width, x, height = value.partition("x")
                if key.endswith("Size") and x and width.isdigit() and height.isdigit():
                    parameters[f"{key}-1"], parameters[f"{key}-2"] = width, height  # as A1111 splits sizes
                else:
                    parameters[key] = value
        return {"info": text, "items": items, "parameters": parameters}

    app.add_middleware(BodyLimit, limit=config.max_body)
    if config.cors_allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_allow_origins.split(","),
                           allow_methods=["*"], allow_headers=["*"])
    if config.api_auth:
        app.add_middleware(BasicAuth, credentials=parse_credentials(config.api_auth))  # outermost: checked first
    return app
