"""The machine a benchmark ran on, in one line: CPU model, the vector/matrix extensions that decide which dtypes run
natively (AVX2, AVX-512, AVX-512 BF16, AMX), and the threads torch uses. Every benchmark prints it with its results."""
import platform

import torch

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def describe() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    have = [flag for flag in FLAGS if flag in flags] or ["flags unknown"]
    return (f"{model}; {' '.join(have)}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    print(describe())
