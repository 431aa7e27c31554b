"""Where a generation's randomness comes from: seeded Gaussian noise per image, on the CPU or as CUDA would draw it,
and the Brownian tree A1111's SDE samplers take their noise from.

A1111 gives image k of a batch its own generator seeded s + k and draws all of that image's noise from it: the
initial latent first, then every noise a stochastic sampler asks for. Its "RNG" setting says which generator:
  * CPU: torch's CPU generator (Mersenne Twister). sdtorch's default: the same image on every device.
  * GPU (A1111's default): torch.randn on the CUDA device, a Philox 4x32-10 stream. It differs from the CPU stream.
  * NV: A1111's re-implementation of the CUDA stream, to get GPU-seeded images on any device. Each call draws from
    counter (offset, 0, i, 0), i the element index, and bumps the offset by one.
"""
import warnings

import numpy as np
import torch

RNG_SOURCES = ("cpu", "nv")
_RNG_ALIASES = {"cpu": "cpu", "nv": "nv", "gpu": "nv"}  # A1111's "GPU" stream is what "NV" reproduces

# Philox 4x32 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"): round multipliers and key bumps
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
# curand's uniform from a 32-bit integer: (x + 1/2)·2⁻³², and the same scaled by 2π, with float32 constants
_TWO_POW32_INV = float(np.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def resolve_rng(name: str) -> str:
    """"cpu" or "nv" for A1111's RNG setting ("CPU", "GPU", "NV"; case ignored). GPU is read as NV."""
    key = str(name).strip().lower()
    if key not in _RNG_ALIASES:
        raise ValueError(f"unknown RNG source {name!r}; choose from CPU, NV (GPU is read as NV)")
    return _RNG_ALIASES[key]


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox 4x32-`rounds` of counters (4, N) under keys (2, N), all uint32 in uint64 arrays: (4, N) outputs.

    Each round multiplies words 0 and 2 by the round constants, keeps both halves of the 64-bit products and mixes
    them with the other words and the key; the key is bumped by the Weyl constants between rounds."""
    c0, c1, c2, c3 = (counter[i].astype(np.uint64) for i in range(4))
    k0, k1 = key[0].astype(np.uint64), key[1].astype(np.uint64)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + np.uint64(_PHILOX_W[0])) & _MASK32, (k1 + np.uint64(_PHILOX_W[1])) & _MASK32
        p0, p1 = c0 * np.uint64(_PHILOX_M[0]), c2 * np.uint64(_PHILOX_M[1])  # exact: 32 x 32 bits fit in 64
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
    return np.stack([c0, c1, c2, c3])


class PhiloxGenerator:
    """A1111's "NV" generator: torch.randn as a CUDA device draws it for `seed`, computed on the CPU with numpy.

    Normals come from the first output of the Box–Muller transform on Philox words 0 and 1 (A1111 discards the
    rest), in float64 arithmetic on curand's float32 constants, rounded to float32."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = int(np.prod(shape, dtype=np.int64))
        counter = np.zeros((4, n), dtype=np.uint64)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint64)
        self.offset += 1
        key = np.array([[self.seed & 0xFFFFFFFF], [(self.seed >> 32) & 0xFFFFFFFF]], dtype=np.uint64).repeat(n, 1)
        words = philox4x32(counter, key)
        u = words[0].astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
        v = words[1].astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
        normal = np.sqrt(-2.0 * np.log(u)) * np.sin(v)
        return torch.from_numpy(normal.astype(np.float32).reshape(shape))


class SeededNoise:
    """Image k of a batch draws all its noise (x_T and the stochastic samplers' noise) from its own generator seeded
    s + k, as A1111 does: image k of a batch equals a single image with seed s + k. With rng="cpu" (the default)
    that is torch's CPU generator: the same image on every device, the same noise diffusers draws with a CPU
    generator. rng="nv" draws CUDA's stream instead (see the module docstring)."""

    def __init__(self, seed: int, batch: int, rng: str = "cpu"):
        self.rng = resolve_rng(rng)
        self.seeds = [seed + k for k in range(batch)]
        if self.rng == "cpu":
            self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        else:
            self.generators = [PhiloxGenerator(s) for s in self.seeds]

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.rng == "cpu":
            return torch.cat([torch.randn((1, *shape), generator=g) for g in self.generators])  # (B, *shape)
        return torch.stack([g.randn(tuple(shape)) for g in self.generators])  # (B, *shape)

    def sampler(self, like: torch.Tensor):
        """A k-diffusion noise_sampler(σ, σ_next) continuing each image's generator."""
        return lambda sigma, sigma_next: self.draw(like.shape[1:]).to(like.device, like.dtype)


def seed_noise(seed: int, batch: int, shape: tuple[int, ...], rng: str = "cpu") -> torch.Tensor:
    """The initial noise of seeds seed .. seed+batch-1: (batch, *shape)."""
    return SeededNoise(seed, batch, rng).draw(shape)


def torchsde_available() -> bool:
    try:
        import torchsde  # noqa: F401
    except ImportError:
        return False
    return True


class BrownianTreeNoise:
    """noise(σ, σ_next) = (W(σ_next) − W(σ))/sqrt(|σ_next − σ|) of one Brownian motion W per image, seeded by the
    image's seed, over [σ_min, σ_max] (k-diffusion's BrownianTreeNoiseSampler, which A1111 uses for DPM++ SDE and
    DPM++ 2M SDE). A tree (torchsde.BrownianTree, Li et al. 2020) gives the same W at a time however it is queried,
    so the noise depends on the seed and the σs only, not on the step count or the batch.

    Needs the optional package torchsde. The tree lives on the CPU in float32, so an image reproduces on every
    device (A1111 builds it on its device: on a GPU its images differ)."""

    def __init__(self, like: torch.Tensor, sigma_min, sigma_max, seeds: list[int]):
        import torchsde

        self.like = like
        t0, t1 = torch.as_tensor(sigma_min).cpu(), torch.as_tensor(sigma_max).cpu()
        if t0 > t1:
            raise ValueError(f"sigma_min {float(t0)} must not exceed sigma_max {float(t1)}")
        w0 = torch.zeros(like.shape[1:], dtype=torch.float32)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = torch.as_tensor(sigma).cpu(), torch.as_tensor(sigma_next).cpu()
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        with warnings.catch_warnings():  # σ_min in float32 lies a rounding below the tree's float start: harmless
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            # the tree answers W(hi) − W(lo); from σ to σ_next that is the increment with σ_next's sign
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return (w / (b - a).abs().sqrt()).to(self.like.device, self.like.dtype)


_warned_torchsde = False


def brownian_noise_or_none(like: torch.Tensor, sigmas: torch.Tensor, seeds: list[int]):
    """A1111's Brownian-tree noise over the positive σs of `sigmas`, or None (with one warning) without torchsde."""
    global _warned_torchsde
    if not torchsde_available():
        if not _warned_torchsde:
            warnings.warn("torchsde is not installed: DPM++ SDE samplers draw independent Gaussians instead of A1111's "
                          "Brownian-tree noise (pip install torchsde to reproduce A1111's images)", stacklevel=3)
            _warned_torchsde = True
        return None
    positive = sigmas[sigmas > 0]
    return BrownianTreeNoise(like, positive.min(), sigmas.max(), seeds)
