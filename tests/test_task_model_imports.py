"""Loading a fine-tuned workdir needs no training code: `sslm_jax.load` in a fresh process leaves
sslm_jax.training (and the fine-tuning loop built on it) out of sys.modules, and still predicts.
It reads the workdir's config.json once.

(optax is imported all the same: flax.nnx itself imports it.)
"""

import json

import pytest
from test_api import run_python
from test_finetune import _config, _mesh, task_dir  # noqa: F401 (a fixture)

import sslm_jax
from sslm_jax.checkpoints import restore
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


def test_loading_a_fine_tuned_workdir_imports_no_training_code_and_reads_it_once(
  task_dir,  # noqa: F811
  tmp_path,
  monkeypatch,
):
  config = _config(task_dir, steps=2)
  config.eval_every_steps = config.checkpoint_every_steps = 2
  workdir = tmp_path / "run"
  finetune.run(config, str(workdir), _mesh(config))
  result = run_python(["-c", _LOAD, str(workdir)], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.strip().splitlines()[-1])
  assert found["kind"] == "TaskModel" and found["label"] in ("no", "yes")
  assert found["loaded"] == []
  reads, read_config = [], restore.read_config
  monkeypatch.setattr(restore, "read_config", lambda w: reads.append(w) or read_config(w))
  assert sslm_jax.load(str(workdir)).classify(["violet river stone"])[0].label == found["label"]
  assert reads == [str(workdir)]
  # The inference layer's own entry takes pretraining workdirs only, and says where to go instead.
  with pytest.raises(UsageError, match=r"holds a fine-tuned classification model.*sslm_jax\.load"):
    language_model.load(str(workdir))
