import subprocess
import sys

CORE = [
  "sslm_jax.layers",
  "sslm_jax.attention",
  "sslm_jax.model",
  "sslm_jax.sharding",
  "sslm_jax.objectives",
  "sslm_jax.optim",
  "sslm_jax.train_state",
  "sslm_jax.train",
  "sslm_jax.checkpoint",
  "sslm_jax.metrics",
  "sslm_jax.tokenizer",
  "sslm_jax.sample",
  "sslm_jax.config",
  "sslm_jax.data.masking",
  "sslm_jax.data.permute",
  "sslm_jax.data.labelled",
  "sslm_jax.data.augment",
  "sslm_jax.data.augment_sources",
  "sslm_jax.data.augment_spec",
  "sslm_jax.data.augment_data",
  "sslm_jax.data.augment_contextual",
  "sslm_jax.augment",
  "sslm_jax.lease",
  "sslm_jax.cluster",
  "sslm_jax.topology",
  "sslm_jax.plan",
  "sslm_jax.restore",
  "sslm_jax.api",
  "sslm_jax.commands",
  "sslm_jax.decode",
  "sslm_jax.decoder",
  "sslm_jax.hf",
  "sslm_jax.hf_tokenizer",
  "sslm_jax.task_metrics",
  "sslm_jax.heads",
  "sslm_jax.finetune",
  "sslm_jax.data.tasks",
  "sslm_jax.early_stopping",
  "sslm_jax.keep_best",
  "sslm_jax.task_model",
]


def test_core_imports_without_tensorflow():
  code = (
    "import sys\n"
    f"for m in {CORE!r}: __import__(m)\n"
    "tf = ('tensorflow', 'tensorflow_datasets')\n"
    "bad = sorted(m for m in sys.modules if m.split('.')[0] in tf)\n"
    "print(bad)\n"
    "sys.exit(1 if bad else 0)\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr


def test_trainer_leaves_torch_out_yet_torch_still_imports_afterwards():
  """torch is a test dependency; tensorboardX imports it whenever it is installed, which cost
  every run 1.7 s. The trainer must not load it, and must not stop a user's later import."""
  code = (
    "import sys\n"
    "import sslm_jax.main\n"
    "loaded = 'torch' in sys.modules\n"
    "import torch\n"
    "print(loaded, torch.ones(2).sum().item())\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.split()[-2:] == ["False", "2.0"], result.stdout
