"""Precision and memory format as one choice (`train.precision`), for training, evaluation and predict.

Measured on this project's CPUs (docs/BENCHMARKS.md, issue 13): on a CPU with native BF16 instructions
(AVX-512 BF16 or AMX, Zen 4/5 and Sapphire Rapids onwards) bf16 autocast roughly doubles a training step
*together with* channels_last, while bf16 in NCHW is several times slower than fp32, and on an AVX2-only CPU
bf16 is emulated and slow in any layout. So `auto` means:

- CUDA: bf16-mixed where the card supports bf16, else 16-mixed; NCHW (unmeasured here: no GPU was lent);
- CPU with avx512_bf16 or amx_bf16 (read from /proc/cpuinfo): bf16-mixed + channels_last, unless the network's
  card says the fast path does not pay for it (`NetworkCard.fast_path`, False for Fovea-UNet, whose
  summed-area tables and gathers get slower in bf16), which keeps fp32;
- otherwise fp32, NCHW.

An explicit `bf16-mixed` on a CPU also uses channels_last (bf16 in NCHW is the slow trap above); `32` and
`16-mixed` are taken as given. Inside autocast the numerically delicate parts stay in fp32: the losses get
fp32 outputs (`SegmentationModule`), Fovea Pooling computes in fp32/fp64 (`models.fovea_pooling`), metrics
read fp32 probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from medseg.models.base import NetworkCard

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PRECISIONS = ("auto", "32", "16-mixed", "bf16-mixed")


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU flags that mean native BF16 arithmetic, from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in BF16_FLAGS if flag in flags]


@dataclass(frozen=True)
class NumericMode:
    """What a run computes in: Lightning's precision string, the memory format, and why."""

    precision: str  # "32-true", "bf16-mixed" or "16-mixed"
    channels_last: bool
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.precision}, {layout} ({self.reason})"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def choose_numeric_mode(requested: str, card: NetworkCard, device_type: str,
                        bf16_flags: list[str] | None = None) -> NumericMode:
    """The mode for `requested` ("auto", "32", "16-mixed", "bf16-mixed") on `device_type` ("cpu" or "cuda")."""
    if requested == "32":
        return NumericMode("32-true", False, "asked for")
    if requested == "16-mixed":
        return NumericMode("16-mixed", False, "asked for")
    if requested == "bf16-mixed":
        on_cpu = device_type == "cpu"
        return NumericMode("bf16-mixed", on_cpu, "asked for" + ("; channels_last, as bf16 pays on a CPU only with it"
                                                                  if on_cpu else ""))
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return NumericMode("bf16-mixed", False, "auto: the GPU supports bf16")
        return NumericMode("16-mixed", False, "auto: the GPU has no bf16")
    flags = cpu_bf16_flags() if bf16_flags is None else bf16_flags
    if not flags:
        return NumericMode("32-true", False, "auto: this CPU has no native BF16 instructions")
    if not card.fast_path:
        return NumericMode("32-true", False, f"auto: the CPU has {'/'.join(flags)}, but this network declares that "
                                             "bf16 does not pay for it")
    return NumericMode("bf16-mixed", True, f"auto: the CPU has {'/'.join(flags)}")
