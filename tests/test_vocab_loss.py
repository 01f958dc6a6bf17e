"""vocab_loss: the chunked cross-entropy equals today's dense path (full float32 logits + optax) in
value and gradient, on one device and on a (data=2, fsdp=2, tensor=2) mesh; its compiled program
holds no [B, T, V] float32 buffer, gathers the embedding once and reduces its gradient once.

Run with `-s` to see the measured differences (lines starting "parity").
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sslm_jax.models import layers
from sslm_jax.models import transformer as model_lib
from sslm_jax.models.config import ModelConfig
from sslm_jax.training import losses as objectives
from sslm_jax.training import sharding, vocab_loss

RULES = sharding.rules_from_config(())
B, T, NUM_MASKED = 8, 32, 12
V, IDS, D = 384, 300, 32  # embedding rows, real ids (rows 300.. are padding), width
CHUNK = 5  # not a divisor of T=32 (-> 4: 8 chunks) nor of NUM_MASKED=12 (-> 4: 3 chunks)
BATCH, VOCAB, EMBED = P(("data", "fsdp")), P("tensor"), P("tensor", "fsdp")


@functools.cache
def _mesh():
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  return sharding.make_mesh(config.mesh)


def _diffs(name, got, want):
  """(max abs, max relative) difference over the leaves. Relative to each leaf's largest value,
  floored at 1e-3 of the largest in the tree: some gradients are zero in exact arithmetic (the
  attention key bias: ~1e-9 here) and only rounding is left of them."""
  pairs = [
    (np.asarray(a, np.float64), np.asarray(b, np.float64))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  ]
  floor = 1e-3 * max(np.abs(b).max() for _, b in pairs)
  worst = max(np.abs(a - b).max() for a, b in pairs)
  rel = max(np.abs(a - b).max() / max(np.abs(b).max(), floor, 1e-30) for a, b in pairs)
  print(f"parity {name}: max abs {worst:.3g}, max rel {rel:.3g}")
  return worst, rel


def _dense(x, emb, bias, targets, weights, dtype="float32"):
  """Today's path: whole float32 logits, padding ids masked, optax's cross-entropy."""
  logits = jnp.einsum(
    "BXD,VD->BXV", x.astype(dtype), emb.astype(dtype), preferred_element_type=jnp.float32
  )
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  logits = jnp.where(jnp.arange(emb.shape[0]) < IDS, logits, layers.PADDING_LOGIT)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return vocab_loss.Sums(
    jnp.sum(weights * nll),
    jnp.sum(weights * (jnp.argmax(logits, -1) == targets)),
    nll,
    jnp.zeros(()),
  )


def _chunked(x, emb, bias, targets, weights, dtype="float32", chunk_len=CHUNK):
  return vocab_loss.cross_entropy_sums(
    x, emb, bias, targets, weights, num_ids=IDS, dtype=dtype, chunk_len=chunk_len
  )


def _with_grads(fn):
  """x, emb, bias, targets, weights -> (Sums, d (loss_sum / 2) / d (x, emb, bias)): a cotangent
  other than 1, as the mean loss gives, so one that is dropped is seen."""

  def run(x, emb, bias, targets, weights):
    sums, vjp = jax.vjp(lambda *a: fn(*a, targets, weights), x, emb, bias)
    half = jnp.full((), 0.5)
    zero = jnp.zeros(())
    return sums, vjp(vocab_loss.Sums(half, zero, jnp.zeros_like(sums.nll_BX), zero))

  return jax.jit(run)


def _arrays(seed=0, x_dtype=np.float32):
  """Hidden states, embedding, bias, targets, weights with exact ties and right answers in them.

  Rows 7 and 250 (on the two vocabulary shards of the mesh) and 20 and 21 (on one shard) are
  equal, and some tokens point straight at them: argmax must pick the first of a tie, as
  jnp.argmax does. Half the other targets are the argmax, so correct_sum is far from 0.
  """
  rng = np.random.default_rng(seed)
  emb = rng.normal(0, 0.5, (V, D)).astype(np.float32)
  emb[250], emb[21] = emb[7], emb[20]
  bias = rng.normal(0, 0.5, V).astype(np.float32)
  bias[250], bias[21] = bias[7], bias[20]
  x = rng.normal(0, 1.0, (B, T, D)).astype(np.float32)
  x[:, :3] = 4 * emb[7]
  x[:, 3:6] = 4 * emb[20]
  targets = rng.integers(0, IDS, (B, T)).astype(np.int32)
  best = np.argmax(np.einsum("BXD,VD->BXV", x, emb)[..., :IDS] + bias[:IDS], -1)
  targets = np.where(rng.random((B, T)) < 0.5, best, targets).astype(np.int32)
  targets[:, 1], targets[:, 4] = 250, 21  # the second of a tie: never the argmax
  weights = rng.choice([0.0, 0.5, 1.0, 2.0], (B, T)).astype(np.float32)
  return x.astype(x_dtype), emb, bias, targets, weights


def _place(mesh, arrays, specs):
  return [
    None if a is None else jax.device_put(a, NamedSharding(mesh, s))
    for a, s in zip(arrays, specs, strict=True)
  ]


# A mesh.rules override that splits the batch over every axis, the vocabulary's included.
ALL_BATCH = (("act_batch", ("data", "fsdp", "tensor")),)


def _on(rules, fn, arrays, bias=True):
  """fn's (Sums, grads) for the arrays, on one device (rules None) or split over the mesh."""
  x, emb, b, targets, weights = arrays
  args = (x, emb, b if bias else None, targets, weights)
  if rules is None:
    return fn(*args)
  mesh, rules = _mesh(), sharding.rules_from_config(rules)
  batch = sharding.batch_sharding(mesh, rules).spec
  with sharding.activate(mesh, rules):
    return fn(*_place(mesh, args, (batch, EMBED, VOCAB, batch, batch)))


def test_chunk_length_divides_the_axis():
  assert vocab_loss.chunk_length(32, 5) == 4
  assert vocab_loss.chunk_length(12, 5) == 4
  assert vocab_loss.chunk_length(12, 8) == 6
  assert vocab_loss.chunk_length(7, 3) == 1
  for whole in (0, 12, 256):
    assert vocab_loss.chunk_length(12, whole) == 12


@pytest.mark.parametrize(
  "rules", [None, (), ALL_BATCH], ids=["one_device", "mesh", "mesh_batch_over_vocab_axis"]
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_matches_the_dense_path_in_value_and_gradient(rules, bias):
  arrays = _arrays()
  (want, want_grads), (got, got_grads) = (
    _on(rules, _with_grads(f), arrays, bias) for f in (_dense, _chunked)
  )
  where = {None: "one device", (): "mesh", ALL_BATCH: "mesh, batch over all axes"}[rules]
  name = f"arrays fp32 {where} {'bias' if bias else 'no bias'}"
  # The ties and the argmax targets are in effect: correct_sum is neither 0 nor everything.
  assert 0 < float(want.correct_sum) < float(np.sum(arrays[4]))
  assert float(got.correct_sum) == float(want.correct_sum)
  assert _diffs(name + " loss", got.loss_sum, want.loss_sum)[1] < 1e-6
  assert _diffs(name + " nll", got.nll_BX, want.nll_BX)[0] < 1e-5
  assert _diffs(name + " grads", got_grads, want_grads)[1] < 1e-5
  if rules == ():
    assert got_grads[1].sharding.spec == EMBED  # the gradient comes back in the parameter's split


def test_bfloat16_compute_is_close_to_float32():
  arrays = _arrays(x_dtype=jnp.bfloat16)
  x32 = (arrays[0].astype(np.float32),) + tuple(arrays[1:])
  want, want_grads = _with_grads(_dense)(*x32)
  low = functools.partial(_chunked, dtype="bfloat16")
  got, got_grads = _with_grads(low)(*arrays)
  assert got_grads[0].dtype == jnp.bfloat16 and got_grads[1].dtype == jnp.float32
  assert _diffs("arrays bf16 vs fp32 loss", got.loss_sum, want.loss_sum)[1] < 1e-3
  assert _diffs("arrays bf16 vs fp32 grads", got_grads, want_grads)[1] < 2e-2
  # The dense path in bfloat16 keeps float32 logits; these store them in bfloat16 (rounding
  # each by up to 2^-9 of its size), then reduce in float32: the sums still agree closely.
  dense_low, dense_low_grads = _with_grads(functools.partial(_dense, dtype="bfloat16"))(*arrays)
  assert _diffs("arrays bf16 vs dense bf16 loss", got.loss_sum, dense_low.loss_sum)[1] < 1e-3
  assert _diffs("arrays bf16 vs dense bf16 grads", got_grads, dense_low_grads)[1] < 1e-2


def _dense_metric_sums(model, batch):
  """objectives.metric_sums as it was: the model's whole logits and optax's cross-entropy."""
  args = [batch["inputs"], batch["positions"], batch["segment_ids"]]
  keys = ("targets", "weights") if model.cfg.causal else ("masked_targets", "masked_weights")
  logits = model(*args) if model.cfg.causal else model(*args, batch["masked_positions"])
  targets, weights = batch[keys[0]], batch[keys[1]]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  sums = {
    "loss_sum": jnp.sum(weights * nll),
    "correct_sum": jnp.sum(weights * (jnp.argmax(logits, -1) == targets)),
    "count": jnp.sum(weights),
  }
  if "target_bytes" in batch:
    text = weights * (batch["target_bytes"] > 0)
    sums["byte_sum"] = jnp.sum(batch["target_bytes"] * text)
    sums["byte_loss_sum"] = jnp.sum(nll * text)
  return sums


def _grad_program(graphdef, sums_fn, batch):
  def loss_sum(params):
    sums = sums_fn(nnx.merge(graphdef, params), batch)
    return sums["loss_sum"], sums

  return jax.jit(jax.value_and_grad(loss_sum, has_aux=True))


@functools.cache
def _model_case(objective):
  """A tiny GPT or BERT with 84 padding rows, a batch in which half the targets are the model's
  argmax, today's dense (sums, grads) on one device and the compiled chunked program on the
  mesh (params and batch split as the trainer splits them)."""
  cfg = ModelConfig(
    objective=objective,
    vocab_size=V,
    real_vocab_size=IDS,
    max_len=T,
    num_layers=2,
    num_heads=4,
    emb_dim=D,
    mlp_dim=64,
    loss_chunk_len=CHUNK,
  )
  graphdef, params = nnx.split(model_lib.build(cfg, seed=0), nnx.Param)
  rng = np.random.default_rng(1)
  batch = {
    "inputs": rng.integers(0, IDS, (B, T)).astype(np.int32),
    "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
    "segment_ids": np.ones((B, T), np.int32),
  }
  model = nnx.merge(graphdef, params)
  if cfg.causal:
    best = np.argmax(np.asarray(model(*batch.values())), -1)
    keys = ("targets", "weights")
    batch["target_bytes"] = rng.integers(0, 4, (B, T)).astype(np.int32)
  else:
    positions = np.sort(rng.permuted(np.tile(np.arange(T), (B, 1)), axis=1)[:, :NUM_MASKED], 1)
    batch["masked_positions"] = positions.astype(np.int32)
    best = np.argmax(np.asarray(model(*batch.values())), -1)
    keys = ("masked_targets", "masked_weights")
  targets = rng.integers(0, IDS, best.shape)
  batch[keys[0]] = np.where(rng.random(best.shape) < 0.5, best, targets).astype(np.int32)
  batch[keys[1]] = rng.choice([0.0, 1.0, 2.0], best.shape).astype(np.float32)
  (_, want), want_grads = _grad_program(graphdef, _dense_metric_sums, batch)(params)

  mesh = _mesh()
  with sharding.activate(mesh, RULES):
    specs = sharding.param_specs(params, RULES)
    placed = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    split_batch = jax.device_put(batch, sharding.batch_sharding(mesh, RULES))
    program = _grad_program(graphdef, objectives.metric_sums, split_batch)
    compiled = program.lower(placed).compile()
    sharded = compiled(placed)
  return graphdef, params, batch, (want, want_grads), sharded, compiled.as_text()


def _assert_sums_and_grads_match(name, got, got_grads, want, want_grads):
  assert set(got) == set(want)
  assert float(got["correct_sum"]) == float(want["correct_sum"]) > 0
  for k in want:
    assert _diffs(f"{name} {k}", got[k], want[k])[1] < 1e-6, k
  assert _diffs(f"{name} grads", got_grads, want_grads)[1] < 1e-5


@pytest.mark.parametrize("objective", ["causal_lm", "masked_lm"])
def test_metric_sums_match_the_dense_path_on_one_device(objective):
  graphdef, params, batch, (want, want_grads), _, _ = _model_case(objective)
  (_, got), got_grads = _grad_program(graphdef, objectives.metric_sums, batch)(params)
  _assert_sums_and_grads_match(f"{objective} one device", got, got_grads, want, want_grads)


@pytest.mark.parametrize("objective", ["causal_lm", "masked_lm"])
def test_metric_sums_match_the_dense_path_on_a_mesh(objective):
  _, _, _, (want, want_grads), ((_, got), got_grads), _ = _model_case(objective)
  emb = got_grads["token_embed"]["embedding"][...]
  assert emb.sharding.spec == EMBED  # really split both ways, as the parameter is
  _assert_sums_and_grads_match(f"{objective} mesh", got, got_grads, want, want_grads)


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
    if head:
      name = head[1]
      comps[name] = []
    elif line.startswith("}"):
      name = None
    elif name:
      comps[name].append(line)
  return comps


def _collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]], bool]]:
  """(kind, result shapes, inside a loop) of each all-gather / all-reduce / reduce-scatter in
  compiled HLO text; inside a loop: in a computation reachable from some while loop's body."""
  comps = _computations(hlo)
  todo = [
    c for lines in comps.values() for line in lines for c in re.findall(r"body=%?([\w.\-]+)", line)
  ]
  in_loop = set()
  while todo:
    name = todo.pop()
    if name in comps and name not in in_loop:
      in_loop.add(name)
      for line in comps[name]:
        todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
  found = []
  for name, lines in comps.items():
    for line in lines:
      op = re.search(r"= (.+?) (all-gather|all-reduce|reduce-scatter)(?:-start)?\(", line)
      if op:
        shapes = [
          tuple(int(n) for n in s.split(",") if n) for s in re.findall(r"\[([\d,]*)\]", op[1])
        ]
        found.append((op[2], shapes, name in in_loop))
  return found


def _largest_vocab_f32(hlo: str, rows: int) -> int:
  """Elements of the largest float32 array with a vocabulary-sized dimension in compiled HLO."""
  shapes = [tuple(int(n) for n in s.split(",") if n) for s in re.findall(r"f32\[([\d,]*)\]", hlo)]
  return max(np.prod(s) for s in shapes if rows in s or V in s)


def _embedding_collectives(hlo: str, rows: int):
  """The collectives whose result has a vocabulary-sized dimension: (kind, shapes, in_loop)."""
  return [c for c in _collectives(hlo) if any(rows in s or V in s for s in c[1])]


def _naive_chunked(x, emb, bias, targets, weights):
  """The chunked loss written as a jax.checkpoint per chunk and left to the SPMD partitioner."""
  b, n, _ = x.shape
  split = lambda a: jnp.swapaxes(a.reshape(b, n // 8, 8, *a.shape[2:]), 0, 1)

  @jax.checkpoint
  def body(total, chunk):
    x, targets, weights = chunk
    logits = jnp.einsum("BKD,VD->BKV", x, emb, preferred_element_type=jnp.float32) + bias
    logits = jnp.where(jnp.arange(V) < IDS, logits, layers.PADDING_LOGIT)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return total + jnp.sum(weights * nll), None

  loss = jax.lax.scan(body, jnp.zeros(()), (split(x), split(targets), split(weights)))[0]
  return vocab_loss.Sums(loss, jnp.zeros(()), jnp.zeros((b, n)), jnp.zeros(()))


def _mesh_hlo(fn, **kwargs):
  """Compiled HLO of fn's (Sums, grads) program on the mesh, for the test arrays."""
  mesh, args = _mesh(), _arrays()
  with sharding.activate(mesh, RULES):
    placed = _place(mesh, args, (BATCH, EMBED, VOCAB, BATCH, BATCH))
    return _with_grads(functools.partial(fn, **kwargs)).lower(*placed).compile().as_text()


def test_on_a_mesh_logits_stay_chunked_and_the_embedding_moves_once():
  rows, width = V // 2, D // 2  # one device's [rows, width] of the [V, D] embedding
  logits = (B // 4) * T * rows  # one device's whole [B, T, V] float32 logits
  gpt_hlo = _model_case("causal_lm")[-1]  # value_and_grad of metric_sums, 8 chunks
  assert _largest_vocab_f32(gpt_hlo, rows) < logits
  # The check sees whole logits where they exist: the same loss in one chunk.
  assert _largest_vocab_f32(_mesh_hlo(_chunked, chunk_len=0), rows) >= logits

  # The train-style program: the embedding is gathered once and its gradient reduce-scattered
  # once, outside every loop; no loop moves a vocabulary-sized array (the layer loops move
  # their own weights, so loops are seen), and no full-width [rows, D] gradient is all-reduced.
  moves = _embedding_collectives(gpt_hlo, rows)
  assert any(in_loop for _, _, in_loop in _collectives(gpt_hlo))
  assert not [m for m in moves if m[2]], moves
  assert [m[:2] for m in moves if m[0] == "all-gather"] == [("all-gather", [(rows, D)])]
  scatters = [m for m in moves if m[0] == "reduce-scatter"]
  assert len(scatters) == 1 and np.prod(scatters[0][1][0]) == rows * width, scatters
  assert not [m for m in moves if m[0] == "all-reduce" and (rows, D) in m[1]], moves

  # The loss alone: exactly one gather, one reduce-scatter (fsdp) and one all-reduce (data) of
  # the embedding, and only [B/4, 4]-sized statistics (max, sum-exp) combined inside its loop.
  hlo = _mesh_hlo(_chunked)
  inside = [c for c in _collectives(hlo) if c[2]]
  assert inside and all(s == (B // 4, 4) for c in inside for s in c[1]), inside
  kinds = sorted(m[0] for m in _embedding_collectives(hlo, rows))
  assert kinds == ["all-gather", "all-reduce", "all-reduce", "reduce-scatter"], kinds  # + d bias

  # Written as a jax.checkpoint per chunk, the same loss gathers the embedding and all-reduces
  # its whole gradient inside the loop: the checks above see it.
  naive = _embedding_collectives(_mesh_hlo(_naive_chunked), rows)
  assert any(m[2] and m[0] == "all-gather" for m in naive), naive
  assert any(m[2] and m[0] == "all-reduce" and (rows, D) in m[1] for m in naive), naive
