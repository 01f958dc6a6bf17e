"""Loading a fine-tuned workdir needs no training code: `sslm_jax.load` in a fresh process leaves
sslm_jax.training (and the fine-tuning loop built on it) out of sys.modules, and still predicts.

(optax is imported all the same: flax.nnx itself imports it.)
"""

import json

import pytest
from test_api import run_python
from test_finetune import _config, _mesh, task_dir  # noqa: F401 (a fixture)

from sslm_jax.errors import UsageError
from sslm_jax.finetune import loop as finetune
from sslm_jax.inference import language_model

_LOAD = """
import json, sys
import sslm_jax
model = sslm_jax.load(sys.argv[1])
prediction = model.classify(["violet river stone"])[0]
training = ("sslm_jax.training", "sslm_jax.finetune.loop", "sslm_jax.finetune.keep_best")
loaded = sorted(m for m in sys.modules if m.startswith(training))
print(json.dumps({"kind": type(model).__name__, "label": prediction.label, "loaded": loaded}))
"""


def test_loading_a_fine_tuned_workdir_imports_no_training_code(task_dir, tmp_path):  # noqa: F811
  config = _config(task_dir, steps=2)
  config.eval_every_steps = config.checkpoint_every_steps = 2
  workdir = tmp_path / "run"
  finetune.run(config, str(workdir), _mesh(config))
  result = run_python(["-c", _LOAD, str(workdir)], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.strip().splitlines()[-1])
  assert found["kind"] == "TaskModel" and found["label"] in ("no", "yes")
  assert found["loaded"] == []
  # The inference layer's own entry takes pretraining workdirs only, and says where to go instead.
  with pytest.raises(UsageError, match=r"holds a fine-tuned classification model.*sslm_jax\.load"):
    language_model.load(str(workdir))
