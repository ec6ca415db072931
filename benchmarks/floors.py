"""What the hardware allows: the measured matrix rate and copy bandwidth that bound a benchmark.

A benchmark's *floor* is the time its arithmetic would take at the measured matrix-multiply
rate (or its memory traffic at the measured copy bandwidth); ``floor / measured`` says how much of
the machine a method uses.
"""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    device: torch.device,
    m: int,
    k: int,
    n: int,
    *,
    dtype: torch.dtype = torch.float32,
    seconds: float = 1.0,
) -> float:
    """Measured FLOP/s of ``(m, k) @ (k, n)`` products (best of repeated timings)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2.0 * m * k * n / best


def copy_bandwidth(device: torch.device, mib: int = 256, seconds: float = 1.0) -> float:
    """Measured bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(mib * 2**20 // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * src.numel() * 4 / best


def lora_training_flops_per_token(model: torch.nn.Module, mean_length: float) -> float:
    """FLOPs per token of LoRA training on a frozen transformer encoder.

    Forward ``2 P`` plus the backward pass to the activations ``2 P`` (no weight gradients for
    frozen weights), with ``P`` the parameters of the transformer's linear layers (embeddings
    and head excluded), plus attention scores and mixing: ``4 L d T`` forward, twice that
    backward, at mean sequence length ``T``. LoRA's own factors add well under 1 % and are left
    out.
    """
    config = model.config
    layers = int(config.num_hidden_layers)
    hidden = int(config.hidden_size)
    linear = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layer." in name and "lora_" not in name:
            linear += module.in_features * module.out_features
    return 4.0 * linear + 12.0 * layers * hidden * mean_length
