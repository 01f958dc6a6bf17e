"""Export a trained workdir as a Hugging Face model directory.

  python -m sslm_jax.export --workdir=runs/gpt_tiny --out=exports/gpt_tiny [--step=N]

writes config.json and model.safetensors (by model.family: GPT2LMHeadModel, BertForMaskedLM,
LlamaForCausalLM or ModernBertForMaskedLM, at the tokenizer's vocabulary size), for causal_lm
generation_config.json, and the tokenizer files, all with the special ids of the run's tokenizer,
so that `transformers.AutoModelForCausalLM.from_pretrained(out)` (or AutoModelForMaskedLM) and
`AutoTokenizer.from_pretrained(out)` load it. Writing needs no torch. A model its Hugging Face
class cannot express (a llama with model.qk_norm) is refused before anything is written.
"""

from __future__ import annotations

import os
import sys

from sslm_jax.errors import SslmError, UsageError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Converting weights needs no accelerator: stay off a GPU or TPU another job may be using.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags, logging
from flax import nnx

from sslm_jax.checkpoints import hf, hf_config
from sslm_jax.inference import language_model as api
from sslm_jax.tokenizer import hf_json as hf_tokenizer

flags.DEFINE_string("workdir", None, "Run directory of a `python -m sslm_jax.main` run.")
flags.DEFINE_string("out", None, "Directory to write the Hugging Face model into.")
flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
flags.DEFINE_bool("overwrite", False, "Write into an existing non-empty --out, replacing files.")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def export(workdir: str, out: str, step: int | None = None, overwrite: bool = False) -> str:
  """Write the Hugging Face files of `workdir` at `step` into `out`; returns a summary line."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f"--out={out} is a file; pass a directory.")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise UsageError(f"--out={out} exists and is not empty; pass --overwrite or another --out.")
  lm = api.load(workdir, step)
  cfg = lm.model_cfg
  if lm.tokenizer.vocab_size != cfg.num_ids:
    raise UsageError(
      f"the tokenizer has {lm.tokenizer.vocab_size} ids but the model {cfg.num_ids}; "
      "restore the run's tokenizer file."
    )
  hf_config.check_exportable(cfg)
  params = nnx.to_pure_dict(nnx.state(lm.model, nnx.Param))
  os.makedirs(out, exist_ok=True)
  hf.save(out, params, cfg, lm.tokenizer)
  hf_tokenizer.save(lm.tokenizer, out, objective=cfg.objective, max_len=cfg.max_len)
  architecture = hf_config.hf_config(cfg)["architectures"][0]
  count = sum(v.size for v in hf.to_hf(params, cfg).values())
  return (
    f"Wrote {out}: {architecture} from {workdir} at step {lm.step}, {count:,} parameters, "
    f"vocabulary {cfg.num_ids}."
  )


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; use --workdir, --out, --step, --overwrite.")
  logging.set_verbosity(logging.WARNING)  # Orbax logs each restore at INFO; the summary suffices
  try:
    print(export(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.overwrite), flush=True)
  except SslmError as e:
    _fail(str(e))


def _fail(message: str):
  print(f"sslm_jax.export: error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main)
