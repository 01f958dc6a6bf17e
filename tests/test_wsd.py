"""opt.schedule='wsd': warmup, a stable peak, and a decay over the last part of the run only, so a
run extended from a checkpoint of its stable phase trains exactly as a longer run would."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from test_train import Killed, _run

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.training import loop as train
from sslm_jax.training import optimizer as optim
from sslm_jax.training import sharding


def _wsd(decay="cosine"):
  opt = tiny_config().opt
  opt.schedule, opt.decay, opt.warmup_steps, opt.decay_fraction = "wsd", decay, 10, 0.2
  opt.learning_rate, opt.final_lr_fraction = 1e-3, 0.1
  return opt


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_wsd_holds_the_peak_then_decays_over_the_last_fraction(decay):
  opt = _wsd(decay)
  short, long = optim.schedule(opt, 100), optim.schedule(opt, 150)
  steps = np.arange(80)  # the short run decays from step 80 (the last 20 of 100)
  np.testing.assert_array_equal(short(steps), long(steps))
  assert float(short(5)) == pytest.approx(5e-4)
  assert float(short(10)) == float(short(79)) == float(long(119)) == pytest.approx(1e-3)
  assert 1e-4 < float(short(90)) < 1e-3 and float(short(90)) < float(long(90))
  assert float(short(100)) == pytest.approx(1e-4) and float(long(150)) == pytest.approx(1e-4)


def test_wsd_needs_a_decay_shape_and_a_fraction_in_range():
  config = tiny_config()
  config.opt.schedule, config.opt.decay = "wsd", "constant"
  with pytest.raises(config_lib.ConfigError, match="opt.decay=cosine or linear"):
    config_lib.validate(config)
  config.opt.decay, config.opt.decay_fraction = "linear", 0.0
  with pytest.raises(config_lib.ConfigError, match="decay_fraction"):
    config_lib.validate(config)
  config.opt.decay_fraction = 1.0
  config_lib.validate(config)
  config.opt.schedule = "cosine"
  with pytest.raises(config_lib.ConfigError, match="opt.schedule='cosine'"):
    config_lib.validate(config)


def test_schedule_change_names_taken_steps_and_the_old_decay():
  opt = _wsd()
  assert optim.schedule_change(opt, 100, 150, 80) is None  # the stable phase: exact
  assert optim.schedule_change(opt, 100, 100, 95) is None
  late = optim.schedule_change(opt, 100, 150, 90)
  assert "step 90 lies in the old schedule's decay phase (from step 80)" in late
  assert "(step 81: 0.00099446 then, 0.001 now)" in late  # the first decayed step
  opt.schedule = "warmup_decay"  # a cosine over the whole run stretches under every taken step
  assert "step 11:" in optim.schedule_change(opt, 100, 150, 40)


def _params(config, workdir):
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  state = train.init_or_restore(config, mesh, str(workdir), checkpoint.fingerprint(config))[0]
  return jax.tree.leaves(jax.device_get(state.params))


def test_extending_a_wsd_run_from_its_stable_phase_is_exact(tmp_path, caplog):
  config = tiny_config()
  config.opt.schedule, config.opt.decay_fraction = "wsd", 0.25
  config.log_every_steps = config.checkpoint_every_steps = 4
  config.num_train_steps = 12
  _run(config, tmp_path / "straight")
  config.num_train_steps = 8  # decays from step 6
  with pytest.raises(Killed):
    _run(config, tmp_path / "extended", kill_at=4)
  config.num_train_steps = 12  # decays from step 9
  _run(config, tmp_path / "extended")
  assert "learning-rate schedule" not in caplog.text
  config.num_train_steps = 13  # resumed at step 12, past the decay of the 12-step schedule
  for a, b in zip(
    _params(config, tmp_path / "straight"),
    _params(config, tmp_path / "extended"),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert "step 12 lies in the old schedule's decay phase (from step 9)" in caplog.text
