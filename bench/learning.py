"""Learning curves at equal compute: eval metrics against the training process's CPU time.

  python bench/learning.py --budget_cpu_s=200 --seeds=0,1,2 --out=learning_results

Runs `python -m sslm_jax.main --config=configs/NAME.py` once per (seed, config, optimizer) in a
fresh temporary workdir, so each run's clock includes training its tokenizer, building its data
cache and compiling. The clock is CPU time (user + system, in CPU-seconds) of the training process
and every process under it, read from /proc while it runs: on a CPU shared with other work, wall
time measures the neighbours as much as the run. A run is stopped (SIGTERM, then SIGKILL) once
its CPU time passes --budget_cpu_s; what it does after that is not counted.

Every run gets the same overrides: opt.schedule='wsd' with num_train_steps far beyond the budget,
so the learning rate stays at each config's peak after its warmup and no run is cut mid-decay; an
eval of 5 batches every 25 steps; no checkpoints or samples. Each line of the workdir's
metrics.jsonl is stamped with the CPU time read when it appeared (every --poll_s seconds).

Runs go seed by seed, the (config, optimizer) pairs rotated between seeds, so a drift in the
machine's load spreads over all of them. Prints Markdown tables: for each metric, the last eval
before each CPU-time point, as the mean over seeds with [min, max]; differences at the budget
paired by seed (llama_tiny - gpt_tiny, modernbert_tiny - bert_tiny, muon - adamw); then steps
reached, CPU-s per step, tokens/s and start-up CPU time per config. Writes every run's records and
curve to OUT/learning.json and each run's log to OUT/logs/; --from_json=OUT/learning.json prints
the tables again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
METRICS = ("eval_loss", "eval_bits_per_byte", "eval_mlm_accuracy")
OVERRIDES = (
  "--config.opt.schedule=wsd",
  "--config.num_train_steps=100000",
  "--config.eval_every_steps=25",
  "--config.eval_steps=5",
  "--config.checkpoint_every_steps=100000",
  "--config.sample_at_end=False",
)


def _stat(pid: int) -> list[str] | None:
  """Fields of /proc/PID/stat after the command name (field 3, the state, first)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()
  except (FileNotFoundError, ProcessLookupError, IndexError):
    return None


def tree_cpu_s(root: int) -> float:
  """CPU-seconds (user + system) of `root` and its descendants, live or already reaped."""
  stats = {int(p): _stat(int(p)) for p in os.listdir("/proc") if p.isdigit()}
  children: dict[int, list[int]] = {}
  for pid, fields in stats.items():
    if fields:
      children.setdefault(int(fields[1]), []).append(pid)
  ticks, todo = 0, [root]
  while todo:
    pid = todo.pop()
    fields = stats.get(pid) or _stat(pid)
    if fields:  # utime, stime, and the reaped children's cutime, cstime
      ticks += sum(int(x) for x in fields[11:15])
    todo += children.get(pid, [])
  return ticks / CLOCK_TICKS


class _Lines:
  """New complete lines of a file that is being appended to."""

  def __init__(self, path: Path):
    self.path, self.offset = path, 0

  def read(self) -> list[str]:
    try:
      with open(self.path, "rb") as f:
        f.seek(self.offset)
        data = f.read()
    except FileNotFoundError:
      return []
    done = data.rfind(b"\n") + 1
    self.offset += done
    return data[:done].decode().splitlines()


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
  """SIGTERM (the run saves a checkpoint and exits), then SIGKILL to its whole group."""
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
      proc.wait(grace_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def run_one(config: str, optimizer: str, seed: int, budget_s: float, poll_s: float, logs: Path):
  """Trains one config until its CPU time passes budget_s; returns its stamped records."""
  name = f"{config}-{optimizer}-s{seed}"
  workdir = Path(tempfile.mkdtemp(prefix=f"learning-{name}-"))
  cmd = [
    sys.executable,
    "-m",
    "sslm_jax.main",
    f"--config={REPO / 'configs' / config}.py",
    f"--workdir={workdir}",
    f"--config.opt.name={optimizer}",
    f"--config.seed={seed}",
    *OVERRIDES,
  ]
  records, lines = [], _Lines(workdir / "metrics.jsonl")
  wall0 = time.perf_counter()
  with open(logs / f"{name}.log", "wb") as log:
    # No shared compilation cache: each run compiles, into its fresh workdir's own cache.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = subprocess.Popen(
      cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    cpu_s = 0.0
    try:
      while proc.poll() is None and cpu_s < budget_s:
        time.sleep(poll_s)
        cpu_s = max(cpu_s, tree_cpu_s(proc.pid))
        stamp = {"cpu_s": round(cpu_s, 2), "wall_s": round(time.perf_counter() - wall0, 2)}
        records += [{**json.loads(line), **stamp} for line in lines.read()]
    finally:
      _stop(proc)
  shutil.rmtree(workdir, ignore_errors=True)
  counted = [r for r in records if r["cpu_s"] <= budget_s]
  failed = proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL) or cpu_s < budget_s
  return {
    "name": name,
    "config": config,
    "optimizer": optimizer,
    "seed": seed,
    "command": " ".join(cmd[1:]),
    "cpu_s": cpu_s,
    "wall_s": time.perf_counter() - wall0,
    "returncode": proc.returncode,
    "failed": failed,
    "records": counted,
    "curve": [
      {k: r[k] for k in ("step", "cpu_s", "wall_s", *METRICS) if k in r}
      for r in counted
      if "eval_loss" in r
    ],
  }


def value_at(curve: list[dict], metric: str, cpu_s: float) -> float | None:
  """The metric of the last eval logged at or before cpu_s CPU-seconds (None before the first)."""
  seen = [p[metric] for p in curve if p["cpu_s"] <= cpu_s and metric in p]
  return seen[-1] if seen else None


def _spread(values: list[float], digits: int) -> str:
  if not values:
    return "-"
  mean = f"{statistics.fmean(values):.{digits}f}"
  return (
    mean if len(values) == 1 else f"{mean} [{min(values):.{digits}f}, {max(values):.{digits}f}]"
  )


def _groups(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
  out: dict[tuple[str, str], list[dict]] = {}
  for r in runs:
    out.setdefault((r["config"], r["optimizer"]), []).append(r)
  return out


def metric_table(runs: list[dict], metric: str, points: list[float]) -> str:
  """Rows (config, optimizer); columns the CPU-time points; cells mean [min, max] over seeds."""
  head = "| config | optimizer | " + " | ".join(f"{p:g} CPU-s" for p in points) + " |"
  rows = [head, "|" + "---|" * (len(points) + 2)]
  for (config, optimizer), group in _groups(runs).items():
    if not any(metric in p for r in group for p in r["curve"]):
      continue
    cells = []
    for p in points:
      values = [v for r in group if (v := value_at(r["curve"], metric, p)) is not None]
      cells.append(_spread(values, 4 if "accuracy" in metric else 3))
    rows.append(f"| {config} | {optimizer} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def run_summary(run: dict) -> dict:
  """Steps reached; the logged training tokens/s (wall clock, so it slows when the machine is
  busy), median over log intervals after the first (which waits on compiling); CPU-s per step
  from the first train log on, evals included; CPU-s of the step-0 eval (tokenizer, data cache,
  start-up and compiling the eval)."""
  records = run["records"]
  train = [r for r in records if "tokens_per_sec" in r]
  last = records[-1] if records else None
  per_step = None
  if train and last["step"] > train[0]["step"]:
    per_step = (last["cpu_s"] - train[0]["cpu_s"]) / (last["step"] - train[0]["step"])
  return {
    "steps": last["step"] if last else 0,
    "tokens_per_s": statistics.median(r["tokens_per_sec"] for r in train[1:])
    if train[1:]
    else None,
    "cpu_s_per_step": per_step,
    "startup_cpu_s": next((r["cpu_s"] for r in records if r["step"] == 0), None),
  }


def speed_table(runs: list[dict]) -> str:
  rows = [
    "| config | optimizer | steps reached | CPU-s per step | tokens/s (wall) "
    "| CPU-s at the step-0 eval | wall s per run |",
    "|---|---|---|---|---|---|---|",
  ]
  for (config, optimizer), group in _groups(runs).items():
    s = [run_summary(r) for r in group]
    cols = [
      _spread([x["steps"] for x in s], 0),
      _spread([x["cpu_s_per_step"] for x in s if x["cpu_s_per_step"]], 3),
      _spread([x["tokens_per_s"] for x in s if x["tokens_per_s"]], 0),
      _spread([x["startup_cpu_s"] for x in s if x["startup_cpu_s"]], 1),
      _spread([r["wall_s"] for r in group], 0),
    ]
    rows.append(f"| {config} | {optimizer} | " + " | ".join(cols) + " |")
  return "\n".join(rows)


def schedule(configs: list[str], optimizers: list[str], seeds: list[int]) -> list[tuple]:
  """Seed-major; the (config, optimizer) pairs rotate between seeds by an odd share of their
  number, so each pair runs at a different place in each seed's round."""
  pairs = [(c, o) for c in configs for o in optimizers]
  shift = (len(pairs) // max(1, len(seeds))) | 1
  order = []
  for i, seed in enumerate(seeds):
    k = (i * shift) % len(pairs)
    order += [(c, o, seed) for c, o in pairs[k:] + pairs[:k]]
  return order


# Each newer family against the one it modernizes, when both ran.
FAMILY_PAIRS = (("llama_tiny", "gpt_tiny"), ("modernbert_tiny", "bert_tiny"))


def difference_table(runs: list[dict], metric: str, point: float) -> str:
  """Paired by seed at one CPU-time point: each newer family minus its older one (same
  optimizer), and each other optimizer minus the first (same config); mean [min, max]."""
  by_key = {(r["config"], r["optimizer"], r["seed"]): r for r in runs}
  groups = _groups(runs)
  optimizers = list(dict.fromkeys(o for _, o in groups))
  comparisons = [
    ((new, o), (old, o)) for new, old in FAMILY_PAIRS for o in optimizers if (new, o) in groups
  ]
  comparisons += [((c, o), (c, optimizers[0])) for c, o in groups if o != optimizers[0]]
  rows = [f"| {metric} at {point:g} CPU-s | minus | difference (per seed) |", "|---|---|---|"]
  for a, b in comparisons:
    diffs = []
    for seed in sorted({s for _, _, s in by_key}):
      ra, rb = by_key.get((*a, seed)), by_key.get((*b, seed))
      va = ra and value_at(ra["curve"], metric, point)
      vb = rb and value_at(rb["curve"], metric, point)
      if va is not None and vb is not None:
        diffs.append(va - vb)
    if diffs:
      digits = 4 if "accuracy" in metric else 3
      rows.append(f"| {' '.join(a)} | {' '.join(b)} | {_spread(diffs, digits)} |")
  return "\n".join(rows) if len(rows) > 2 else ""


def report(runs: list[dict], points: list[float]) -> str:
  parts = []
  for metric in METRICS:
    parts += [
      f"### {metric} (last eval at or before each point)",
      "",
      metric_table(runs, metric, points),
      "",
    ]
  parts += ["### Differences at the budget, paired by seed", ""]
  for metric in METRICS:
    table = difference_table(runs, metric, points[-1])
    parts += [table, ""] if table else []
  parts += ["### Speed", "", speed_table(runs), ""]
  failed = [r["name"] for r in runs if r["failed"]]
  if failed:
    parts += [f"Failed runs (see their logs): {', '.join(failed)}", ""]
  return "\n".join(parts)


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--budget_cpu_s", type=float, default=200.0)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--configs", default="llama_tiny,gpt_tiny,modernbert_tiny,bert_tiny")
  p.add_argument("--optimizers", default="adamw,muon")
  p.add_argument(
    "--points", default="", help="CPU-s points of the tables; default: quarters of the budget"
  )
  p.add_argument("--poll_s", type=float, default=0.25)
  p.add_argument("--out", default="", help="results folder; default: a new temporary folder")
  p.add_argument("--from_json", default="", help="print the tables of a saved learning.json")
  a = p.parse_args()
  budget = a.budget_cpu_s
  points = (
    [float(x) for x in a.points.split(",")] if a.points else [budget * q / 4 for q in (1, 2, 3, 4)]
  )
  if a.from_json:
    saved = json.loads(Path(a.from_json).read_text())
    print(report(saved["runs"], points if a.points else saved["points"]))
    return
  out = Path(a.out or tempfile.mkdtemp(prefix="learning-"))
  (out / "logs").mkdir(parents=True, exist_ok=True)
  order = schedule(
    a.configs.split(","), a.optimizers.split(","), [int(s) for s in a.seeds.split(",")]
  )
  runs, wall0 = [], time.perf_counter()
  for i, (config, optimizer, seed) in enumerate(order, start=1):
    run = run_one(config, optimizer, seed, budget, a.poll_s, out / "logs")
    runs.append(run)
    last = run["curve"][-1] if run["curve"] else {}
    print(
      f"[{i}/{len(order)}] {run['name']}: {run['cpu_s']:.0f} CPU-s, {run['wall_s']:.0f} s wall, "
      f"last eval step {last.get('step')} eval_loss {last.get('eval_loss')}"
      + (" FAILED" if run["failed"] else ""),
      file=sys.stderr,
      flush=True,
    )
    summary = {"budget_cpu_s": budget, "points": points, "argv": sys.argv, "overrides": OVERRIDES}
    summary["total_wall_s"] = time.perf_counter() - wall0
    (out / "learning.json").write_text(json.dumps({**summary, "runs": runs}, indent=1))
  print(report(runs, points))
  print(f"\n{len(runs)} runs in {time.perf_counter() - wall0:.0f} s wall; results in {out}")


if __name__ == "__main__":
  main()
