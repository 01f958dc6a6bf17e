import glob
import importlib.util
import json
import os
import re
from unittest import mock

import jax
import pytest
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.models import transformer as model_lib

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_there_are_configs():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"gpt_tiny.py", "bert_tiny.py", "gpt_base.py", "bert_base.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates_and_initialises_abstractly(path):
  config = _load(path)
  config_lib.validate(config)
  model_cfg = config_lib.model_config(config)
  abstract = nnx.eval_shape(lambda: model_lib.build(model_cfg, config.seed))
  params = nnx.state(abstract, nnx.Param)
  assert model_lib.count_params(params) > 0
  with open(path) as f:
    assert "python -m sslm_jax.main --config=configs/" in f.read(), (
      "config must open with its command"
    )


def _layer_params(d: int, f: int) -> int:
  """q, k, v, out (kernels and biases), fc and proj, two LayerNorms."""
  return 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * (2 * d)


def _gpt2_params(v: int, t: int, d: int, f: int, layers: int) -> int:
  """Token and position tables, the layers, the final LayerNorm; the output is tied."""
  return v * d + t * d + layers * _layer_params(d, f) + 2 * d


def _bert_mlm_params(v: int, t: int, d: int, f: int, layers: int) -> int:
  """Word, position and 2 token-type tables, embedding LayerNorm, layers, MLM head (dense,
  LayerNorm, output bias; decoder tied). No pooler: pretraining without next-sentence
  prediction does not use it."""
  return v * d + t * d + 2 * d + 2 * d + layers * _layer_params(d, f) + (d * d + d + 2 * d) + v


def test_parameter_formulas_match_the_published_counts():
  # GPT2LMHeadModel 'gpt2' and BertForMaskedLM 'bert-base-uncased' as published.
  assert _gpt2_params(50257, 1024, 768, 3072, 12) == 124_439_808
  assert _bert_mlm_params(30522, 512, 768, 3072, 12) == 109_514_298


@pytest.mark.parametrize(
  "name, formula", [("gpt_base.py", _gpt2_params), ("bert_base.py", _bert_mlm_params)]
)
def test_base_shapes_match_the_published_models_exactly(name, formula):
  """Exact counts at our padded vocabulary: a pooler or a missing table would show."""
  config = _load(os.path.join(os.path.dirname(__file__), "..", "configs", name))
  abstract = nnx.eval_shape(lambda: model_lib.build(config_lib.model_config(config), 0))
  m = config.model
  expected = formula(
    config_lib.padded_vocab_size(config), config.data.seq_len, m.emb_dim, m.mlp_dim, m.num_layers
  )
  assert model_lib.count_params(nnx.state(abstract, nnx.Param)) == expected


@pytest.mark.parametrize(
  "field, value, words",
  [
    ("objective", "mlm", "objective"),
    ("batch_size", 0, "batch_size"),
    ("data.seq_len", -1, "seq_len"),
    ("num_train_steps", 0, "num_train_steps"),
    ("eval_steps", 0, "eval_steps"),
    ("data.source", "web", "data.source"),
    ("model.attention_impl", "flash", "attention_impl"),
    ("model.attention_impl", "cudnn", "needs a GPU"),
    ("compiler_options", "xla_cpu_use_onednn", "compiler_options"),
  ],
)
def test_validation_names_the_field(field, value, words):
  config = config_lib.defaults()
  parent, _, leaf = field.rpartition(".")
  (config[parent] if parent else config)[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=words):
    config_lib.validate(config)


def _documented_overrides(path) -> dict:
  """--config.X=V pairs of the command a config file opens with."""
  with open(path) as f:
    doc = f.read().split('"""')[1]
  return dict(re.findall(r"--config\.([\w.]+)=(\S+)", doc))


def _declared_splits(name: str, tmp: str) -> set[str]:
  """The splits a TFDS dataset's own builder code generates, found offline (files go in `tmp`).

  Each download is answered with a local file shaped like a finished Wikipedia dump index (the
  only download a split generator of our configs' datasets reads); nothing is fetched.
  """
  import tensorflow_datasets as tfds

  info = os.path.join(tmp, "dumpstatus.json")
  with open(info, "w") as f:
    json.dump({"jobs": {"articlesmultistreamdump": {"status": "done", "files": {}}}}, f)
  manager = mock.MagicMock(manual_dir=tmp)
  fake = lambda urls: jax.tree.map(lambda _: info, urls)  # noqa: E731
  for method in ("download", "download_and_extract", "extract"):
    getattr(manager, method).side_effect = fake
  builder = tfds.builder(name, data_dir=tmp)
  with mock.patch.object(builder, "_generate_examples", return_value=iter(())):
    generators = builder._split_generators(manager)
  names = generators if isinstance(generators, dict) else [g.name for g in generators]
  return {str(n) for n in names}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_documented_tfds_splits_exist(path, tmp_path):
  overrides = _documented_overrides(path)
  if overrides.get("data.source") != "tfds":
    return
  config = _load(path)
  declared = _declared_splits(overrides["data.tfds_name"], str(tmp_path))
  for split in (config.data.tfds_train_split, config.data.tfds_eval_split):
    assert split.split("[")[0] in declared, (path, split, declared)


def test_documented_commands_name_tfds_configs():
  """The check above must see the configs that document a TFDS command."""
  tfds_configs = {os.path.basename(p) for p in CONFIGS if _documented_overrides(p)}
  assert {"gpt_base.py", "bert_base.py"} <= tfds_configs


def test_closest_field_suggestion():
  config = config_lib.defaults()
  assert config_lib.closest_field(config, "data.seq_lne") == "data.seq_len"
  assert config_lib.closest_field(config, "num_train_step") == "num_train_steps"


def test_jax_sees_eight_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_compute_in_bf16_on_accelerators_and_fp32_on_cpu(path):
  config = _load(path)
  for platform, dtype in (("tpu", "bfloat16"), ("gpu", "bfloat16"), ("cpu", "float32")):
    cfg = config_lib.model_config(config, platform=platform)
    assert (cfg.dtype, cfg.param_dtype) == (dtype, "float32"), (platform, path)
    assert config_lib.resolved(config, platform).model.dtype == dtype
  # Here (a CPU backend) a run resolves to float32; an explicit field wins everywhere.
  assert config_lib.model_config(config).dtype == "float32"
  config.model.dtype = "float32"
  assert config_lib.model_config(config, platform="tpu").dtype == "float32"


@pytest.mark.parametrize("seq_len, impl", [(1024, "splash"), (512, "splash"), (100, "xla")])
def test_auto_attention_is_splash_on_tpu_where_its_blocks_fit(seq_len, impl):
  config = config_lib.defaults()
  config.data.seq_len = seq_len
  assert config_lib.attention_impl(config, "tpu") == impl
  assert config_lib.attention_impl(config, "cpu") == "xla"


def test_two_sources_of_starting_weights_are_named_before_either_is_read(tmp_path):
  hf_dir = tmp_path / "hf"  # a Hugging Face directory that does not match the config at all
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 7}))
  config = config_lib.defaults()
  config.finetune.task, config.finetune.init_from = "classification", str(tmp_path)
  config.finetune.train_files = str(tmp_path / "train.jsonl")
  config.init_from_hf = str(hf_dir)
  with pytest.raises(config_lib.ConfigError, match="both name starting weights"):
    config_lib.validate(config)
