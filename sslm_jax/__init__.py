"""sslm_jax: GPT and BERT pretraining in JAX/Flax NNX.

`sslm_jax.load(workdir)` returns a trained model (see sslm_jax/loading.py): a LanguageModel
(inference/language_model.py) for a pretraining workdir, a TaskModel (finetune/task_model.py) for a
fine-tuning one. Both are imported on first use, so that `python -m sslm_jax.main` and the core
modules do not pay for them.

Layers, lowest first. A module imports its own package and the layers above it in this list,
never one below it, and no import closes a cycle; tests/test_layers.py reads this list and checks
every import against it, function-level ones included:

  errors        the one base class of the errors a user can fix (errors.py)
  cluster       joining processes, rendezvous, the workdir lease, preemption, TPU topologies
  models        the Transformer: config, layers, attention, GPT-2, BERT, Llama, ModernBERT, FLOPs
  tokenizer     SentencePiece models and Hugging Face tokenizer.json files
  config        the run's ml_collections config: defaults, validation, derived values
  checkpoints   Orbax checkpoints, reading a workdir back, Hugging Face weights
  training      sharding rules, optimizer, losses, the jitted step, the loop, metrics, the plan
  inference     the loaded language model, KV-cache decoding, samples
  data          the pretraining input pipeline (TensorFlow) and data/augment's text transforms
  finetune      task heads, labelled data, the fine-tuning loop, the loaded task model

The modules at sslm_jax/ itself are the commands (`python -m sslm_jax.main`, prepare, generate,
fill_mask, score, export, predict, augment, bench) and sit above every layer.
"""

__all__ = ["LanguageModel", "load"]


def __getattr__(name: str):
  if name == "load":
    from sslm_jax import loading  # on first use, for its cost (JAX, Flax, Orbax)

    return loading.load
  if name == "LanguageModel":
    from sslm_jax.inference import language_model  # on first use, for its cost

    return language_model.LanguageModel
  raise AttributeError(f"module 'sslm_jax' has no attribute {name!r}")
