"""The one table of accelerator chips: peak matmul rate (MFU), HBM per chip (fit checks) and, for TPUs,
how `vX-N` slice names count chips and how libtpu groups a chip's cores into devices."""

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str                       # TPU generation ('v5p') or GPU model ('H100')
  device_kinds: tuple[str, ...]   # substrings of jax.Device.device_kind that identify it
  peak_tflops: float              # dense bfloat16, per chip
  hbm_gib: float | None           # per chip (None: the model comes in several sizes)
  cores_per_chip: int = 0         # TPUs: TensorCores that `vX-N` counts (N = chips * cores_per_chip)
  chip_config: str = ''           # TPUs: libtpu's name for how a chip's cores form devices


# Matched in order, first match wins ('TPU v5 lite' before 'TPU v5', which is how v5p reports itself).
CHIPS = (
    Chip('v6e', ('TPU v6 lite', 'TPU v6e'), 918.0, 32, 1, 'default'),  # Trillium
    Chip('v5e', ('TPU v5 lite', 'TPU v5e'), 197.0, 16, 1, 'default'),
    Chip('v5p', ('TPU v5p', 'TPU v5'), 459.0, 95, 2, 'megacore'),
    Chip('v4', ('TPU v4',), 275.0, 32, 2, 'megacore'),
    Chip('H200', ('H200',), 989.0, 141),
    Chip('H100', ('H100',), 989.0, 80),
    Chip('A100', ('A100',), 312.0, None),
)
TPUS = {c.name: c for c in CHIPS if c.cores_per_chip}


def chip_of(device: jax.Device | None = None) -> Chip | None:
  """The chip behind a device (default: the first device), or None where unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  return next((c for c in CHIPS if any(k.lower() in kind for k in c.device_kinds)), None)


def peak_tflops(device: jax.Device | None = None) -> float | None:
  """The chip's peak bf16 TFLOP/s, or None where unknown (e.g. CPU)."""
  chip = chip_of(device)
  return chip.peak_tflops if chip else None
