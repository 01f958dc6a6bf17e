"""The built-in fine-tuning task serves the number of examples asked for."""

from collections import Counter

from sslm_jax.finetune import tasks


def test_builtin_eval_split_has_the_count_asked_for():
  # 250 per class is what fine-tuning asks for (finetune.BUILTIN_EVAL_PER_CLASS); the eval files
  # alone hold ~211 per class at two snippets per file.
  examples = tasks.builtin_examples("eval", 250)
  assert Counter(e.label for e in examples) == {"def": 250, "no_def": 250}
  assert [e.label for e in examples[:4]] == ["def", "no_def", "def", "no_def"]
  keys = {e.where.split(" ")[0] for e in examples}
  assert not keys & {e.where.split(" ")[0] for e in tasks.builtin_examples("train", 50)}
