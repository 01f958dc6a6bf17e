"""Continue prompts with a trained causal_lm model (GPT or Llama).

  python -m sslm_jax.generate --workdir=runs/gpt_tiny "def main(" --max_new_tokens=32

Several prompts may follow one another; "" starts from nothing. --json prints one object per
(prompt, sample): {"prompt", "sample", "continuation"}.
"""

from __future__ import annotations

import json

from absl import flags

from sslm_jax import commands
from sslm_jax.checkpoints import restore
from sslm_jax.errors import UsageError
from sslm_jax.inference import language_model as api

flags.DEFINE_string("workdir", None, "Workdir of a causal_lm (GPT or Llama) training run.")
flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to add per sample (EOS stops earlier).")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Sample from the k likeliest tokens only (0: all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus: sample from the top tokens of this mass (1: all).")
flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same samples.")
flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
flags.DEFINE_bool("json", False, "One JSON object per line instead of text for people.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  prompts = argv[1:]
  if not prompts:
    raise UsageError(
      'give at least one prompt: python -m sslm_jax.generate --workdir=W "prompt" ("" starts '
      "from nothing)."
    )
  run = restore.read_workdir(FLAGS.workdir, FLAGS.step)
  if not run.fine_tuned and run.config.objective != "causal_lm":
    raise UsageError(
      f"{FLAGS.workdir} holds a {api.model_kind(run.config)} model, which cannot generate text; "
      "give generate a causal_lm (GPT or Llama) workdir, or use python -m sslm_jax.fill_mask "
      "with this one."
    )
  lm = api.from_saved(run)  # refuses a fine-tuning workdir
  samples = lm.generate(
    prompts,
    max_new_tokens=FLAGS.max_new_tokens,
    temperature=FLAGS.temperature,
    top_k=FLAGS.top_k,
    top_p=FLAGS.top_p,
    seed=FLAGS.seed,
    num_samples=FLAGS.num_samples,
  )
  for prompt, continuations in zip(prompts, samples, strict=True):
    for i, continuation in enumerate(continuations):
      if FLAGS.json:
        record = {"prompt": prompt, "sample": i, "continuation": continuation}
        print(json.dumps(record, ensure_ascii=False))
      else:
        print(f"=== prompt {prompt!r}, sample {i + 1} of {len(continuations)}")
        print(prompt + continuation)


if __name__ == "__main__":
  commands.run_command(main)
