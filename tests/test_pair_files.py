"""pair_classification training files must have a text_pair, as predict's reading of them does."""

import json
import re

import pytest

from sslm_jax import config as config_lib
from sslm_jax.data.labelled import LabelledDataError
from sslm_jax.finetune import loop as finetune


@pytest.mark.parametrize(
  "name, content, expected",
  [
    ("t.jsonl", json.dumps({"text": "a", "label": "x"}) + "\n", "row 1 has no 'text_pair' field"),
    ("t.tsv", "text\tlabel\na\tx\n", "row 1 (the header) has no 'text_pair' column"),
    ("t.csv", "text,text_pair,label\na,,x\n", "row 2: 'text_pair' is empty"),
  ],
)
def test_pair_classification_training_refuses_files_without_text_pair(
  tmp_path, name, content, expected
):
  path = tmp_path / name
  path.write_text(content)
  c = config_lib.defaults()
  c.finetune.task = "pair_classification"
  c.finetune.train_files = c.finetune.eval_files = str(path)
  with pytest.raises(LabelledDataError, match=re.escape(f"{path} {expected}")):
    finetune.task_examples(c)
