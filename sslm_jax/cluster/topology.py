"""Cloud TPU slice names -> the chips behind them, for compiling ahead of time without a TPU.

A name is `<generation>-<size>` as Cloud TPU spells accelerator types: v4 and v5p sizes count
TensorCores, two per chip (v5p-64 is 32 chips); v5e (also `v5litepod-N`) and v6e sizes count
chips (v5e-256 is 256 chips). `<generation>:<chip grid>` (v5p:4x4x8) names a grid directly. An
`<N>x` prefix asks for N slices joined over the data-center network (multislice): 2xv5p-64.

`devices()` turns a name into compile-only devices with libtpu (`pip install "jax[tpu]"`); no
TPU is needed, and the default JAX backend of the process stays what it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re

import jax

from sslm_jax.errors import SslmError

GiB = 2**30


class TopologyError(SslmError, ValueError):
  """A topology name or setup that cannot work; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation, with the per-chip figures of Google's Cloud TPU architecture pages.

  HBM is in binary units: the v4 page says 32 GiB; the v5e, v5p and v6e pages write "GB" for
  16, 95 and 32, taken as GiB (XLA's own compile limit on v5e is 15.75 GiB, just under 16 GiB).
  Bandwidths are in bytes/s as printed in GBps (v6e: 1640; one revision of its page says 1600).
  The bf16 peak lives in models/flops.py, keyed by `device_kind`, beside the GPU figures.
  """

  generation: str  # as libtpu's topology names spell it
  aliases: tuple[str, ...]  # other spellings accepted in names
  cores_in_name: bool  # the size in a name counts TensorCores (2 per chip), not chips
  grid_dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  max_chips: int  # largest single slice
  hbm_bytes: int
  hbm_bytes_per_s: float
  chip_config: str  # libtpu's chip configuration: one JAX device per chip, as on a TPU VM

  def chips_per_host(self, grid: tuple[int, ...]) -> list[int] | None:
    """Chips per host (TPU VM); None leaves libtpu's default of 2x2x1, right for v4 and v5p."""
    if self.grid_dims == 3:
      return None
    return [min(2, grid[0]), min(4, grid[1]), 1]  # 8 chips per host, fewer on sub-host slices


CHIPS = (
  Chip("v4", (), True, 3, 4096, 32 * GiB, 1200e9, "megacore"),
  Chip("v5p", (), True, 3, 6144, 95 * GiB, 2765e9, "default"),
  Chip("v5e", ("v5litepod",), False, 2, 256, 16 * GiB, 819e9, "default"),
  Chip("v6e", (), False, 2, 256, 32 * GiB, 1640e9, "default"),
)
_BY_NAME = {name: chip for chip in CHIPS for name in (chip.generation, *chip.aliases)}

# Grids of the chip counts Cloud TPU offers below one 64-chip cube (3-D) and for 2-D slices.
_SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
_2D = {
  1: (1, 1),
  4: (2, 2),
  8: (2, 4),
  16: (4, 4),
  32: (4, 8),
  64: (8, 8),
  128: (8, 16),
  256: (16, 16),
}

FORMS = (
  "valid forms: v4-N and v5p-N (N counts TensorCores, 2 per chip: v4-8 .. v4-8192, "
  "v5p-8 .. v5p-12288), v5e-N or v5litepod-N and v6e-N (N counts chips: 1, 4, 8, 16, .. 256), "
  "<generation>:<chip grid> such as v5p:4x4x8 or v6e:8x16, each with an optional <slices>x "
  "prefix for multislice, e.g. 2xv5p-64"
)
_NAME = re.compile(r"(?:(\d+)x)?(v[0-9a-z]+?)(?:-(\d+)|:(\d+(?:x\d+)+))")


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given
  chip: Chip
  grid: tuple[int, ...]  # chips along each torus axis of one slice
  num_slices: int

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.grid)

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def slice_name(self) -> str:
    """One slice as Cloud TPU names its accelerator type, e.g. 'v5p-64'."""
    per_chip = 2 if self.chip.cores_in_name else 1
    return f"{self.chip.generation}-{self.chips_per_slice * per_chip}"

  @property
  def libtpu_name(self) -> str:
    """The topology string libtpu's get_topology_desc takes, e.g. 'v5p:2x4x4'."""
    return f"{self.chip.generation}:{'x'.join(map(str, self.grid))}"


def _cube_grid(chips: int) -> tuple[int, ...] | None:
  """The most cube-like grid of 64 chips or more whose sides are multiples of 4 (a 4x4x4 cube)."""
  if chips % 64:
    return None
  units = chips // 64
  best = None
  for a in range(1, round(units ** (1 / 3)) + 2):
    for b in range(a, int(math.isqrt(units // a)) + 1):
      c = units // (a * b)
      if a * b * c == units and c >= b and (best is None or c < best[2]):
        best = (a, b, c)
  return None if best is None else tuple(4 * side for side in best)


def _grid_for(chip: Chip, chips: int) -> tuple[int, ...] | None:
  if chips < 1 or chips > chip.max_chips:
    return None
  if chip.grid_dims == 2:
    return _2D.get(chips)
  return _SMALL_3D.get(chips) or _cube_grid(chips)


def parse(name: str) -> Topology:
  """'v5p-64' -> 32 v5p chips on a 2x4x4 grid; '2xv5e-256' -> two 16x16 slices."""
  match = _NAME.fullmatch(name.strip().lower())
  chip = match and _BY_NAME.get(match.group(2))
  if not match or chip is None:
    raise TopologyError(f"unknown TPU topology {name!r}; {FORMS}.")
  slices_text, _, size_text, grid_text = match.groups()
  num_slices = int(slices_text or 1)
  if grid_text:
    grid = tuple(int(side) for side in grid_text.split("x"))
    if len(grid) != chip.grid_dims or 0 in grid or math.prod(grid) > chip.max_chips:
      raise TopologyError(
        f"TPU topology {name!r}: a {chip.generation} slice is a {chip.grid_dims}-D grid of at "
        f"most {chip.max_chips} chips; {FORMS}."
      )
  else:
    size = int(size_text)
    chips = size // 2 if chip.cores_in_name and size % 2 == 0 else size
    grid = None if chip.cores_in_name and size % 2 else _grid_for(chip, chips)
    if grid is None:
      unit = "TensorCores (2 per chip)" if chip.cores_in_name else "chips"
      raise TopologyError(
        f"TPU topology {name!r}: Cloud TPU offers no {chip.generation} slice of {size} {unit}; "
        f"{FORMS}."
      )
  if num_slices < 1:
    raise TopologyError(f"TPU topology {name!r}: the number of slices must be 1 or more; {FORMS}.")
  return Topology(name=name, chip=chip, grid=grid, num_slices=num_slices)


def plan_only_process() -> None:
  """Keep JAX's own backend on the CPU in a process that only compiles for described slices.

  With libtpu installed, JAX would otherwise try to start a local TPU when first asked for a
  device and log why it cannot. Call before anything touches a device; later it changes nothing,
  and neither does it where JAX_PLATFORMS is set.
  """
  from jax._src import xla_bridge  # no public way to ask whether the backend has started

  if not jax.config.jax_platforms and not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")


def _libtpu_missing() -> str | None:
  if importlib.util.find_spec("libtpu") or os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")):
    return None
  pin = next(
    (r.split(";")[0] for r in importlib.metadata.requires("jax") or () if r.startswith("libtpu")),
    "libtpu",
  )
  return (
    f"--topology compiles for TPU with libtpu, which is not installed here; "
    f'pip install "jax[tpu]=={jax.__version__}" (it brings {pin}, about 700 MB), '
    "or pip install -e '.[test]'."
  )


@contextlib.contextmanager
def _quiet_libtpu(topology: Topology):
  """libtpu reads these when it loads; without them it logs errors about the missing TPU VM,
  and it refuses to load while another process holds it (its lockfile guards a real TPU).

  Set only while libtpu loads, never left behind: launchers and jax.distributed read
  TPU_WORKER_HOSTNAMES to find the hosts of a real slice.
  """
  quiet = {
    "TPU_ACCELERATOR_TYPE": topology.slice_name,
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_SKIP_MDS_QUERY": "1",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
  }
  saved = {k: os.environ.get(k) for k in quiet}
  os.environ.update({k: v for k, v in quiet.items() if saved[k] is None})
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)


def devices(topology: Topology) -> list:
  """Compile-only devices of the slice(s), one per chip, with their hosts and slice indices."""
  missing = _libtpu_missing()
  if missing:
    raise TopologyError(missing)
  from jax.experimental import topologies

  options = {"chip_config_name": topology.chip.chip_config}
  if topology.chip.chips_per_host(topology.grid):
    options["chips_per_host_bounds"] = topology.chip.chips_per_host(topology.grid)
  if topology.num_slices > 1:
    options["num_slices"] = topology.num_slices
  with _quiet_libtpu(topology):
    try:
      found = topologies.get_topology_desc(
        topology_name=topology.libtpu_name, platform="tpu", **options
      ).devices
    except jax.errors.JaxRuntimeError as e:
      raise TopologyError(
        f"libtpu refused TPU topology {topology.name!r} ({topology.libtpu_name}): {e}"
      ) from e
  if len(found) != topology.num_chips:
    raise TopologyError(
      f"libtpu made {len(found)} devices for {topology.name!r}, expected {topology.num_chips} "
      "chips; this libtpu does not match the JAX version."
    )
  return list(found)
