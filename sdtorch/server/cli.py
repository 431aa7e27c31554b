"""`sdtorch serve`: the A1111 web API and a web page on one model worker (needs the `serve` extra)."""
from __future__ import annotations

import ipaddress
import sys
import threading
from pathlib import Path

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the A1111 web API (/sdapi/v1) and a web page")
    p.add_argument("--model", help="the model loaded first (default: the first under --models-dir, else built-in)")
    p.add_argument("--models-dir", help="the models clients may switch between (sd_model_checkpoint)")
    p.add_argument("--host", help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--listen", action="store_true", help="listen on all interfaces (0.0.0.0), as A1111's flag")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-auth", help="HTTP Basic credentials for every route: user:pass[,user2:pass2]")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 503 + Retry-After")
    p.add_argument("--max-pixels", type=int, default=2048 * 2048,
                   help="largest width x height x batch_size of a request, and of an uploaded image")
    p.add_argument("--outdir", default="outputs", help="where save_images writes NNNNN-SEED.png")
    p.add_argument("--cors-allow-origins", help="comma-separated origins allowed by CORS (default: CORS off)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    from ..cli import add_weights_option

    add_weights_option(p)


def run_serve(args) -> int:
    """Bad options raise ValueError: the CLI prints it in one line and exits 2 (CLIError would be a second class when
    the CLI runs as `python -m sdtorch.cli`)."""
    try:
        import uvicorn

        from .app import ServerConfig, build_app, parse_credentials
        from .checkpoints import Checkpoints
        from .worker import Worker
    except ImportError as e:
        raise ValueError(f"sdtorch serve needs the serve extra: pip install 'sdtorch[serve]' ({e.name} is missing)") \
            from None
    from .. import BUILTIN_MODEL

    if args.models_dir and not Path(args.models_dir).is_dir():
        raise ValueError(f"--models-dir: no such folder: {args.models_dir}")
    if args.model and not Path(args.model).exists():
        raise ValueError(f"--model: not found: {args.model}")
    for name in ("max_queue", "max_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.api_auth:
        parse_credentials(args.api_auth)  # ValueError: one line, exit 2
    checkpoints = Checkpoints(args.models_dir, args.model)
    if not checkpoints.items:
        checkpoints = Checkpoints(args.models_dir, BUILTIN_MODEL)
    first = checkpoints.of_path(Path(args.model)) if args.model else next(iter(checkpoints.items.values()))
    host = args.host or ("0.0.0.0" if args.listen else DEFAULT_HOST)
    if not _loopback(host) and not args.api_auth:
        print(f"sdtorch serve: warning: listening on {host} without --api-auth: anyone who can reach this port can "
              "use it", file=sys.stderr)

    from .. import memory

    if args.device in ("auto", "cpu"):
        memory.keep_freed_blocks()  # before any thread starts: a thread keeps the malloc arena of its first malloc
    worker = Worker(device=args.device, dtype=args.dtype, max_queue=args.max_queue, weights=args.weights)
    worker.load(first)
    flags = {"api": True, "nowebui": False, "listen": not _loopback(host), "server_name": host, "port": args.port,
             "ckpt": str(first.path), "ckpt_dir": args.models_dir, "data_dir": str(Path.cwd()),
             "api_auth": "***" if args.api_auth else None, "cors_allow_origins": args.cors_allow_origins,
             "device": args.device, "dtype": args.dtype, "weights": args.weights, "max_queue": args.max_queue,
             "max_pixels": args.max_pixels}
    config = ServerConfig(models_dir=args.models_dir, outdir=args.outdir, max_pixels=args.max_pixels,
                          api_auth=args.api_auth, cors_allow_origins=args.cors_allow_origins, flags=flags)
    app = build_app(worker, checkpoints, config)
    print(f"sdtorch serve: http://{host}:{args.port}/ (model {first.title}; API at /sdapi/v1)", file=sys.stderr,
          flush=True)
    # HTTP in a thread of its own, the generations in this (main) thread: see server/worker.py
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=args.port, log_level="warning", access_log=False))
    http = threading.Thread(target=server.run, name="sdtorch-http", daemon=True)
    http.start()
    try:
        worker.run(keep_going=http.is_alive)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
    return 0 if server.started else 1


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
