"""How close a run comes to the hardware limit: the device's dense bf16 peak, a measured matmul peak, MFU.

MFU = model FLOPs per second / the device's dense bf16 tensor-core peak. Model FLOPs are the analytic count of
the work the model needs (2 FLOPs per multiply-add, the padded shapes actually computed), not what the kernels
happen to execute; recomputation or wasted padding beyond the batch's own longest row do not raise it. The peak
is the spec sheet's, looked up by `torch.cuda.get_device_name`; an unknown device or a CPU has none, and MFU is
then null with the reason. Next to it, `measured_matmul_tflops` times one large matmul on the device: what a
dense kernel actually reaches there (on a CPU the only peak there is).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s with fp32 accumulate, from NVIDIA's spec sheets: the
# sheets print the sparse figure first, the dense one is half of it. Matched against
# torch.cuda.get_device_name() in this order (the first pattern contained in the name wins, case-insensitive).
#   H100 SXM / H200 SXM: 1,979 sparse (H100 and H200 datasheets; Hopper whitepaper table 3: 989.4 dense)
#   H100 NVL / H200 NVL: 1,671 sparse (H100 NVL and H200 NVL datasheets)
#   H100 PCIe: 1,513 sparse (H100 datasheet; 756.5 dense)
#   A100 (SXM4 and PCIe, 40/80 GB): 312 dense (A100 datasheet; A100 whitepaper table 1)
#   L40S: 362.05 dense / 733 sparse (L40S datasheet)
#   L40: 181.05 dense / 362.1 sparse (L40 datasheet)
#   L4: 121 dense / 242 sparse (L4 datasheet)
#   A10: 125 dense / 250 sparse (A10 datasheet). AWS's A10G is a different part with lower clocks and no
#     published tensor figure: it is left out (MFU null; the measured matmul still says what it reaches)
#   RTX 4090: 165.2 dense / 330.4 sparse, bf16 with fp32 accumulate (Ada Lovelace whitepaper, appendix A)
#   V100 (SXM2 125, PCIe 112): no bf16 tensor cores; the fp16 tensor-core peak (V100 datasheet) is used
PEAKS: tuple[tuple[str, float, str], ...] = (
    ("H100 NVL", 835.5, "NVIDIA H100 NVL datasheet: 1,671 bf16 TFLOP/s with sparsity, dense half"),
    ("H100 PCIe", 756.5, "NVIDIA H100 datasheet (PCIe): 1,513 bf16 TFLOP/s with sparsity, dense half"),
    ("H100", 989.4, "NVIDIA H100 datasheet (SXM5): 1,979 bf16 TFLOP/s with sparsity, dense half"),
    ("H200 NVL", 835.5, "NVIDIA H200 NVL datasheet: 1,671 bf16 TFLOP/s with sparsity, dense half"),
    ("H200", 989.4, "NVIDIA H200 datasheet (SXM): 1,979 bf16 TFLOP/s with sparsity, dense half"),
    ("A100", 312.0, "NVIDIA A100 datasheet: 312 bf16 TFLOP/s dense"),
    ("L40S", 362.05, "NVIDIA L40S datasheet: 362.05 bf16 TFLOP/s dense"),
    ("L40", 181.05, "NVIDIA L40 datasheet: 362.1 bf16 TFLOP/s with sparsity, dense half"),
    ("L4", 121.0, "NVIDIA L4 datasheet: 242 bf16 TFLOP/s with sparsity, dense half"),
    ("A10", 125.0, "NVIDIA A10 datasheet: 125 bf16 TFLOP/s dense"),
    ("RTX 4090", 165.2, "NVIDIA Ada Lovelace whitepaper: 165.2 bf16 TFLOP/s dense, fp32 accumulate"),
    ("V100S", 130.0, "NVIDIA V100S datasheet: 130 fp16 tensor TFLOP/s (V100 has no bf16)"),
    ("V100-PCIE", 112.0, "NVIDIA V100 datasheet (PCIe): 112 fp16 tensor TFLOP/s (V100 has no bf16)"),
    ("V100", 125.0, "NVIDIA V100 datasheet (SXM2): 125 fp16 tensor TFLOP/s (V100 has no bf16)"),
)


# Names that would match a pattern above but are other parts, with why they have no figure here.
NO_FIGURE: tuple[tuple[str, str], ...] = (
    ("A10G", "AWS's A10G publishes no tensor-core figure (it is not the A10 of the 125 TFLOP/s datasheet)"),
)


@dataclass(frozen=True)
class Peak:
    """The device and its spec-sheet dense bf16 peak; `tflops` None (and `source` the reason) when unknown."""

    device: str
    tflops: float | None
    source: str


def device_name(device: torch.device) -> str:
    """What the device calls itself: the CUDA name, or "cpu" (with the processor when the platform says)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    processor = platform.processor() or platform.machine()
    return f"cpu ({processor})" if processor else "cpu"


def lookup_peak(name: str) -> Peak:
    """The table's dense bf16 peak for a device name, or None with the reason (a CPU, or a GPU not in the table)."""
    if name.lower().startswith("cpu"):
        return Peak(name, None, "no tensor-core peak for a CPU: MFU is not defined here; see measured_matmul_tflops")
    lowered = name.lower()
    for pattern, reason in NO_FIGURE:
        if pattern.lower() in lowered:
            return Peak(name, None, f"{name!r}: {reason}; MFU null, see measured_matmul_tflops")
    for pattern, tflops, source in PEAKS:
        if pattern.lower() in lowered:
            return Peak(name, tflops, source)
    known = ", ".join(pattern for pattern, _, _ in PEAKS)
    return Peak(name, None, f"{name!r} is not in smop.hardware.PEAKS ({known}): MFU null; add its spec-sheet figure")


def device_peak(device: torch.device) -> Peak:
    return lookup_peak(device_name(device))


def measured_matmul_tflops(device: torch.device, size: int | None = None, repeats: int = 5) -> float:
    """TFLOP/s (2 per multiply-add) of `size`^3 matmuls on `device`, the best of `repeats` after one warm-up:
    bf16 8192^3 on a GPU (about 1.1 PFLOP per call, milliseconds on an H100), fp32 1024^3 on a CPU (2.1 GFLOP:
    tens of milliseconds), so that measuring costs no more than a training step."""
    gpu = device.type == "cuda"
    size = size or (8192 if gpu else 1024)
    dtype = torch.bfloat16 if gpu else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    best = float("inf")
    for i in range(repeats + 1):
        if gpu:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if gpu:
            torch.cuda.synchronize(device)
        if i > 0:  # the first call pays for kernel selection and allocation
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def hardware(device: torch.device, measure: bool = False) -> dict[str, Any]:
    """results.json's `cost.hardware`: the device, its table peak and where it comes from, and (`measure`) the
    measured matmul TFLOP/s (null when not measured)."""
    peak = device_peak(device)
    return {
        "device": peak.device,
        "peak_tflops_bf16": peak.tflops,
        "peak_source": peak.source,
        "measured_matmul_tflops": measured_matmul_tflops(device) if measure else None,
    }


def mfu(flops_per_s: float | None, peak: Peak) -> tuple[float | None, str | None]:
    """Model FLOPs utilisation and, when it is null, why."""
    if flops_per_s is None:
        return None, "no model FLOP count for this run (see model_flops_note)"
    if peak.tflops is None:
        return None, peak.source
    return flops_per_s / (peak.tflops * 1e12), None
