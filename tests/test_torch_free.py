"""The trainer leaves torch out. Which modules may import TensorFlow: test_layers.py."""

import subprocess
import sys


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
