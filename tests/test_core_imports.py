import subprocess
import sys

CORE = [
  "sslm_jax.models.layers",
  "sslm_jax.models.attention",
  "sslm_jax.models.transformer",
  "sslm_jax.training.sharding",
  "sslm_jax.training.losses",
  "sslm_jax.training.optimizer",
  "sslm_jax.training.state",
  "sslm_jax.training.loop",
  "sslm_jax.checkpoints.checkpointer",
  "sslm_jax.training.metrics",
  "sslm_jax.tokenizer.sentencepiece",
  "sslm_jax.inference.sample",
  "sslm_jax.config",
  "sslm_jax.data.masking",
  "sslm_jax.data.permute",
  "sslm_jax.finetune.labelled",
  "sslm_jax.data.augment.transforms",
  "sslm_jax.data.augment.sources",
  "sslm_jax.config.augment_spec",
  "sslm_jax.data.augment.apply",
  "sslm_jax.data.augment.contextual",
  "sslm_jax.augment",
  "sslm_jax.cluster.lease",
  "sslm_jax.cluster.join",
  "sslm_jax.cluster.topology",
  "sslm_jax.training.plan",
  "sslm_jax.checkpoints.restore",
  "sslm_jax.inference.language_model",
  "sslm_jax.commands",
  "sslm_jax.inference.decode",
  "sslm_jax.inference.decoder",
  "sslm_jax.checkpoints.hf",
  "sslm_jax.tokenizer.hf_json",
  "sslm_jax.finetune.metrics",
  "sslm_jax.finetune.heads",
  "sslm_jax.finetune.loop",
  "sslm_jax.finetune.tasks",
  "sslm_jax.finetune.early_stopping",
  "sslm_jax.finetune.keep_best",
  "sslm_jax.finetune.task_model",
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
