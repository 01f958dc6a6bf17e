"""bench/learning.py's clock and tables, on a busy child process and on hand-made curves."""

import importlib.util
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("learning", ROOT / "bench" / "learning.py")
learning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning)

# Spends 0.5 CPU-seconds, says so, then idles until killed.
BUSY = (
  "import time\n"
  "t = time.process_time()\n"
  "while time.process_time() - t < 0.5: pass\n"
  "print('done', flush=True)\n"
  "time.sleep(60)\n"
)


def test_tree_cpu_counts_live_and_reaped_descendants():
  before = learning.tree_cpu_s(os.getpid())
  child = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline() == "done\n"
    assert learning.tree_cpu_s(child.pid) >= 0.5
    assert learning.tree_cpu_s(os.getpid()) - before >= 0.5  # a live child
  finally:
    child.kill()
    child.wait()
  assert learning.tree_cpu_s(os.getpid()) - before >= 0.5  # reaped: its parent's cutime


def curve(*points):
  return [{"step": 25 * i, "cpu_s": t, "eval_loss": v} for i, (t, v) in enumerate(points)]


def test_value_at_takes_the_last_eval_logged_by_then():
  c = curve((30.0, 8.3), (60.0, 6.0), (90.0, 5.0))
  assert learning.value_at(c, "eval_loss", 29.9) is None
  assert learning.value_at(c, "eval_loss", 30.0) == 8.3
  assert learning.value_at(c, "eval_loss", 89.0) == 6.0
  assert learning.value_at(c, "eval_loss", 200.0) == 5.0
  assert learning.value_at(c, "eval_mlm_accuracy", 200.0) is None


def test_metric_table_gives_mean_and_range_over_seeds():
  runs = [
    {"config": "gpt_tiny", "optimizer": "adamw", "curve": curve((30.0, 8.0), (60.0, 6.0))},
    {"config": "gpt_tiny", "optimizer": "adamw", "curve": curve((30.0, 8.0), (70.0, 5.0))},
    {"config": "gpt_tiny", "optimizer": "muon", "curve": curve((30.0, 8.0), (50.0, 4.0))},
  ]
  rows = learning.metric_table(runs, "eval_loss", [40.0, 65.0]).splitlines()
  assert rows[0] == "| config | optimizer | 40 CPU-s | 65 CPU-s |"
  assert rows[2] == "| gpt_tiny | adamw | 8.000 [8.000, 8.000] | 7.000 [6.000, 8.000] |"
  assert rows[3] == "| gpt_tiny | muon | 8.000 | 4.000 |"


def test_schedule_runs_every_combination_once_seed_by_seed():
  order = learning.schedule(["a", "b", "c", "d"], ["x", "y"], [0, 1, 2])
  assert sorted(order) == sorted((c, o, s) for c in "abcd" for o in "xy" for s in (0, 1, 2))
  assert [s for _, _, s in order] == [0] * 8 + [1] * 8 + [2] * 8
  firsts = [order[8 * i][:2] for i in range(3)]
  assert len(set(firsts)) == 3  # each seed's round starts with another pair


def test_difference_table_pairs_runs_by_seed():
  def run(config, optimizer, seed, loss):
    return {"config": config, "optimizer": optimizer, "seed": seed, "curve": curve((30.0, loss))}

  runs = [
    run("gpt_tiny", "adamw", 0, 5.0),
    run("gpt_tiny", "adamw", 1, 4.0),
    run("llama_tiny", "adamw", 0, 4.5),
    run("llama_tiny", "adamw", 1, 3.8),
    run("gpt_tiny", "muon", 1, 3.0),
  ]
  rows = learning.difference_table(runs, "eval_loss", 50.0).splitlines()
  assert rows[2] == "| llama_tiny adamw | gpt_tiny adamw | -0.350 [-0.500, -0.200] |"
  assert rows[3] == "| gpt_tiny muon | gpt_tiny adamw | -1.000 |"  # seed 1 only
  assert len(rows) == 4
