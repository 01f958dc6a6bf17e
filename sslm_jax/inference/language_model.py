"""A trained workdir as a Python object: logits, generate, fill_mask, score, embed.

  import sslm_jax
  lm = sslm_jax.load("runs/gpt_tiny")            # newest checkpoint, parameters only
  lm.generate("def main(", max_new_tokens=32)     # GPT
  lm.fill_mask("x = [MASK](1, 2)")                # BERT

Here GPT stands for either causal_lm family (gpt2, llama) and BERT for either masked_lm family
(bert, modernbert): the methods use only what the families of an objective share.

This is the model of a pretraining workdir; `sslm_jax.load` gives a fine-tuning workdir's
finetune/task_model.TaskModel instead (sslm_jax/loading.py). The workdir is read once by
checkpoints/restore.read_workdir; parameters are restored alone (no optimizer state) onto one
device, whatever mesh wrote them.
Nothing here writes to the workdir, and TensorFlow is never imported.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from etils import epath
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import restore
from sslm_jax.cluster import join as cluster
from sslm_jax.errors import UsageError
from sslm_jax.inference import decode, decoder
from sslm_jax.tokenizer import sentencepiece as tok
from sslm_jax.tokenizer.sp_model import ModelProto

# As the commands do: on a host without TPU chips, keep JAX from starting libtpu (installed with
# jax[tpu]), which would log its failure to find a TPU at the first use of a device. Nothing
# changes where JAX_PLATFORMS (or jax_platforms) is set.
cluster.skip_tpu_without_chips()

MASK_TEXT = "[MASK]"
POOLINGS = ("mean", "cls", "last")
_ROWS_PER_CALL = 16  # sequences per forward pass: bounds the [B, T, V] logits held at once


_FAMILY_NAMES = {"gpt2": "GPT", "bert": "BERT", "llama": "Llama", "modernbert": "ModernBERT"}


def model_kind(config) -> str:
  """How messages name a run's model: its family and objective, e.g. 'Llama (causal_lm)'."""
  return f"{_FAMILY_NAMES[config_lib.family(config)]} ({config.objective})"


def load(workdir: str, step: int | str | None = None) -> LanguageModel:
  """The model of a pretraining workdir at `step` (default: its newest checkpoint; a step typed
  as text, "100", is that step). A fine-tuning workdir is refused: sslm_jax.load gives its
  TaskModel."""
  return from_saved(restore.read_workdir(workdir, step))


def from_saved(run: restore.SavedRun) -> LanguageModel:
  """The LanguageModel of a pretraining workdir read by restore.read_workdir."""
  if run.fine_tuned:
    raise UsageError(
      f"{run.workdir} holds a fine-tuned {run.config.finetune.task} model, whose task head "
      "predicts labels, not tokens; load it with sslm_jax.load (classify, tag) or python -m "
      "sslm_jax.predict, or give the workdir of a pretraining run."
    )
  tokenizer = restore.load_tokenizer(run)
  model = restore.restore_model(run)
  return LanguageModel(run.config, config_lib.model_config(run.config), model, tokenizer, run.step)


@dataclasses.dataclass(frozen=True)
class Score:
  """How likely a model finds a text. For BERT the log-probs are pseudo-log-likelihoods: each
  token predicted with only itself masked."""

  text: str
  tokens: list[str]  # pieces, with SentencePiece's visible space shown as " "
  token_ids: list[int]
  log_probs: list[float]  # natural log of each token's probability
  total_nats: float  # -sum(log_probs)
  num_bytes: int  # UTF-8 bytes of `text`
  bits_per_byte: float  # total_nats / ln 2 / num_bytes


# Forward passes, compiled once per (model, input shape); inputs are padded to a few lengths.
@nnx.jit
def _causal_logits(model, inputs_BT, positions_BT, segments_BT):
  return model(inputs_BT, positions_BT, segments_BT)


@nnx.jit
def _causal_target_log_probs(model, inputs_BT, positions_BT, segments_BT, targets_BT):
  log_probs_BTV = jax.nn.log_softmax(model(inputs_BT, positions_BT, segments_BT))
  return jnp.take_along_axis(log_probs_BTV, targets_BT[..., None], axis=-1)[..., 0]


@nnx.jit
def _masked_logits(model, inputs_BT, positions_BT, segments_BT, masked_BP):
  return model(inputs_BT, positions_BT, segments_BT, masked_BP)


@nnx.jit
def _masked_target_log_probs(model, inputs_BT, positions_BT, segments_BT, masked_BP, targets_BP):
  log_probs_BPV = jax.nn.log_softmax(model(inputs_BT, positions_BT, segments_BT, masked_BP))
  return jnp.take_along_axis(log_probs_BPV, targets_BP[..., None], axis=-1)[..., 0]


@nnx.jit
def _hidden(model, inputs_BT, positions_BT, segments_BT):
  return model.hidden(inputs_BT, positions_BT, segments_BT)


def _padded(rows: list[list[int]], max_len: int):
  """inputs, positions, segment ids [B, T] for rows of ids, T a power of two (>= 16, capped at
  max_len) so that few shapes are compiled. Padding is segment 0, which nothing attends to."""
  longest = max(len(r) for r in rows)
  length = min(max_len, max(16, 1 << max(0, longest - 1).bit_length()))
  inputs_BT = np.zeros((len(rows), length), np.int32)  # any id: padding is never attended
  segments_BT = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    inputs_BT[i, : len(row)] = row
    segments_BT[i, : len(row)] = 1
  positions_BT = np.broadcast_to(np.arange(length, dtype=np.int32), inputs_BT.shape)
  return inputs_BT, positions_BT, segments_BT


def _chunks(items: list, size: int = _ROWS_PER_CALL):
  for start in range(0, len(items), size):
    yield items[start : start + size]


def _as_list(texts: str | Sequence[str]) -> list[str]:
  return [texts] if isinstance(texts, str) else list(texts)


def _windows(n: int, window: int) -> list[tuple[int, int, int]]:
  """(start, first, end) per window over the targets 1..n of [BOS] + n ids: the window's inputs
  are sequence[start:end] and it scores targets first..end. Each target is scored once; after
  the first window every target has at least half a window of context."""
  spans, done = [], 0
  while done < n:
    end = min(done + window // 2 if done else window, n)
    spans.append((max(0, end - window), done + 1, end))
    done = end
  return spans


class LanguageModel:
  """A trained GPT or BERT (or Llama, ModernBERT) with its tokenizer; see `load`."""

  def __init__(self, config, model_cfg, model, tokenizer: tok.Tokenizer, step: int):
    self.config = config
    self.model_cfg = model_cfg
    self.model = model
    self.tokenizer = tokenizer
    self.step = step
    self._continuation_sp = None
    self._decoding = None  # the weights in decoding layout, made by the first generate

  def __repr__(self) -> str:
    c = self.model_cfg
    return (
      f"LanguageModel({model_kind(self.config)}, step {self.step}, {c.num_layers} layers, width "
      f"{c.emb_dim}, {c.max_len} positions, vocab {self.tokenizer.vocab_size})"
    )

  # ------------------------------------------------------------------------------- inputs

  def _require(self, objective: str, method: str, instead: str) -> None:
    if self.config.objective != objective:
      raise UsageError(
        f"this workdir holds a {model_kind(self.config)} model, which cannot {method}; {instead}"
      )

  def _text_ids(self, text: str, masks: bool) -> list[int]:
    """Ids of `text`; with `masks`, each literal [MASK] becomes MASK_ID standing for one piece
    (with the space before it, as a masked '▁word' piece had in training). A [MASK] that opens
    the text takes the document's leading space; after a lone space (" [MASK]") that leading
    space stays, as the piece '▁' before a masked '▁word'."""
    if not masks or MASK_TEXT not in text:
      return self.tokenizer.encode(text)
    parts = text.split(MASK_TEXT)
    head = parts[0].removesuffix(" ")
    ids = self.tokenizer.encode(head) if head else self._encode_continuation(parts[0])
    for i, part in enumerate(parts[1:], start=1):
      part = part.removesuffix(" ") if i < len(parts) - 1 else part
      ids += [self.tokenizer.mask_id] + self._encode_continuation(part)
    return ids

  def _encode_continuation(self, text: str) -> list[int]:
    """Ids of text that continues a document (after a [MASK]): without the space SentencePiece
    puts in front of a document, so ' of' is '▁of', not '▁▁of'."""
    if not isinstance(self.tokenizer, tok.Tokenizer):  # another tokenizer kind: plain encoding
      return self.tokenizer.encode(text)
    if self._continuation_sp is None:
      proto = ModelProto()
      proto.ParseFromString(epath.Path(self.tokenizer.path).read_bytes())
      proto.normalizer_spec.add_dummy_prefix = False
      self._continuation_sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return self._continuation_sp.encode(text, out_type=int)

  def encode(self, text: str) -> list[int]:
    """The ids the model reads for `text`: GPT [BOS] + ids; BERT [CLS] + ids + [SEP], with each
    literal [MASK] as the mask id."""
    if self.model_cfg.causal:
      return [self.tokenizer.bos_id] + self._text_ids(text, masks=False)
    t = self.tokenizer
    return [t.cls_id] + self._text_ids(text, masks=True) + [t.sep_id]

  def _fit(self, ids: list[int], text: str, what: str = "text") -> list[int]:
    limit = self.model_cfg.max_len
    if len(ids) > limit:
      raise UsageError(
        f"the {what} {text[:40]!r}... is {len(ids)} tokens with its special tokens, more than "
        f"the model's {limit} positions (model.max_positions); shorten it."
      )
    return ids

  def token_text(self, token_id: int) -> str:
    """A token's piece as text: SentencePiece's visible space shown as a space."""
    return self.tokenizer.id_to_piece(token_id).replace("\u2581", " ")

  # ------------------------------------------------------------------------------ methods

  def logits(self, texts: str | Sequence[str]) -> list[np.ndarray]:
    """float32 [len(encode(text)), vocab] per text. GPT: row t predicts the token after
    encode(text)[t] (the last row, what follows the text); BERT: the MLM logits at every
    position. Only the tokenizer's ids, never padding rows of the embedding."""
    rows = [self._fit(self.encode(t), t) for t in _as_list(texts)]
    out = []
    for chunk in _chunks(rows):
      batch = _padded(chunk, self.model_cfg.max_len)
      if self.model_cfg.causal:
        logits_BTV = _causal_logits(self.model, *batch)
      else:
        masked_BT = np.asarray(batch[1])  # every position
        logits_BTV = _masked_logits(self.model, *batch, masked_BT)
      logits_BTV = np.asarray(logits_BTV[..., : self.tokenizer.vocab_size])
      out += [logits_BTV[i, : len(r)] for i, r in enumerate(chunk)]
    return out

  def generate(
    self,
    prompts: str | Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 1,
  ) -> list[list[str]]:
    """Continuations, [prompt][sample], of each prompt (GPT). A sample stops at EOS or after
    `max_new_tokens` or at the model's last position. top_k=0 and top_p=1 sample from the
    whole distribution; special ids other than EOS are never produced."""
    self._require("causal_lm", "generate text", "use fill_mask, score or embed with it.")
    if min(max_new_tokens, num_samples) < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
      raise UsageError(
        f"max_new_tokens={max_new_tokens}, num_samples={num_samples} (both >= 1), "
        f"temperature={temperature} (>= 0; 0 is greedy), top_k={top_k} (>= 0; 0 is off), "
        f"top_p={top_p} (in (0, 1]; 1 is off): bring the one out of range into range."
      )
    prompts = _as_list(prompts)
    prompt_ids = [self._fit(self.encode(p), p, "prompt") for p in prompts]
    for ids, text in zip(prompt_ids, prompts, strict=True):
      if len(ids) >= self.model_cfg.max_len:
        raise UsageError(
          f"the prompt {text[:40]!r}... is {len(ids)} tokens with BOS, which fills the model's "
          f"{self.model_cfg.max_len} positions (model.max_positions) and leaves no room to "
          "generate; shorten it."
        )
    if self._decoding is None:
      self._decoding = decoder.to_decode_layout(self.model)
    new_ids = decode.generate(
      self._decoding,
      prompt_ids,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      seed=seed,
      num_samples=num_samples,
      eos_id=self.tokenizer.eos_id,
      banned_ids=decode.banned_ids(self.tokenizer),
    )
    out = [[] for _ in prompts]
    for i, ids in enumerate(new_ids):
      prompt = prompt_ids[i // num_samples]
      # Decoded together, so that the first new piece keeps its leading space.
      shown = self.tokenizer.decode(prompt)
      out[i // num_samples].append(self.tokenizer.decode(prompt + list(ids))[len(shown) :])
    return out

  def fill_mask(self, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Per [MASK] in `text` (BERT), the top_k (token, probability) pairs, best first.

    Probabilities are over ordinary tokens: special and padding ids are never proposed.
    """
    self._require("masked_lm", "fill in a [MASK]", "use generate, score or embed with it.")
    ids = self._fit(self.encode(text), text)
    masked = [i for i, t in enumerate(ids) if t == self.tokenizer.mask_id]
    if not masked:
      raise UsageError(
        f"{text!r} has no {MASK_TEXT}; write {MASK_TEXT} where a token should be filled in, e.g. "
        f"'Machine learning is an {MASK_TEXT} of artificial intelligence.'"
      )
    if top_k < 1:
      raise UsageError(f"top_k={top_k}: ask for at least 1 guess per [MASK].")
    batch = _padded([ids], self.model_cfg.max_len)
    logits_PV = np.asarray(_masked_logits(self.model, *batch, np.asarray([masked], np.int32)))[0]
    ordinary_V = np.arange(logits_PV.shape[-1]) < self.tokenizer.vocab_size
    ordinary_V[sorted(self.tokenizer.special_ids)] = False
    logits_PV = np.where(ordinary_V, logits_PV, -np.inf)
    probs_PV = np.exp(logits_PV - logits_PV.max(-1, keepdims=True))
    probs_PV /= probs_PV.sum(-1, keepdims=True)
    k = min(top_k, int(ordinary_V.sum()))
    out = []
    for probs_V in probs_PV:
      best = np.argsort(-probs_V, kind="stable")[:k]
      out.append([(self.token_text(i), float(probs_V[i])) for i in best])
    return out

  def score(self, texts: str | Sequence[str]) -> list[Score]:
    """Log-probabilities of each text's tokens.

    GPT: log p(token | BOS and the tokens before it); a text longer than the model's positions
    is read in windows of model.max_positions tokens advancing by half a window, so every token is
    scored once with at least half a window of context. BERT: the pseudo-log-likelihood, each
    token masked in turn (one forward pass per token, batched); the text must fit the positions.
    """
    texts = _as_list(texts)
    ids = [self._text_ids(t, masks=False) for t in texts]
    if not all(ids):
      raise UsageError("cannot score an empty text; give at least one character.")
    if self.model_cfg.causal:
      log_probs = self._causal_scores(ids)
    else:
      log_probs = self._pseudo_log_likelihoods(ids, texts)
    out = []
    for text, text_ids, lp in zip(texts, ids, log_probs, strict=True):
      total, num_bytes = -float(np.sum(lp)), len(text.encode("utf-8"))
      out.append(
        Score(
          text=text,
          tokens=[self.token_text(i) for i in text_ids],
          token_ids=list(text_ids),
          log_probs=[float(x) for x in lp],
          total_nats=total,
          num_bytes=num_bytes,
          bits_per_byte=total / math.log(2) / num_bytes,
        )
      )
    return out

  def _causal_scores(self, ids: list[list[int]]) -> list[np.ndarray]:
    window = self.model_cfg.max_len
    jobs = []  # (text index, inputs, targets, first scored target within the window)
    for i, text_ids in enumerate(ids):
      sequence = [self.tokenizer.bos_id] + text_ids
      for start, first, end in _windows(len(text_ids), window):
        jobs.append((i, sequence[start:end], sequence[start + 1 : end + 1], first - start - 1))
    pieces = [[] for _ in ids]
    for chunk in _chunks(jobs):
      batch = _padded([j[1] for j in chunk], window)
      targets_BT = _padded([j[2] for j in chunk], window)[0]
      log_probs_BT = np.asarray(_causal_target_log_probs(self.model, *batch, targets_BT))
      for row, (i, _, targets, skip) in enumerate(chunk):
        pieces[i].append(log_probs_BT[row, skip : len(targets)])
    return [np.concatenate(p) for p in pieces]

  def _pseudo_log_likelihoods(self, ids: list[list[int]], texts: list[str]) -> list[np.ndarray]:
    out = []
    for text, text_ids in zip(texts, ids, strict=True):
      framed = self._fit([self.tokenizer.cls_id] + text_ids + [self.tokenizer.sep_id], text)
      rows = []
      for position in range(1, len(framed) - 1):
        row = list(framed)
        row[position] = self.tokenizer.mask_id
        rows.append((row, position))
      log_probs = []
      for chunk in _chunks(rows, 4 * _ROWS_PER_CALL):
        batch = _padded([r for r, _ in chunk], self.model_cfg.max_len)
        masked_B1 = np.asarray([[p] for _, p in chunk], np.int32)
        targets_B1 = np.asarray([[framed[p]] for _, p in chunk], np.int32)
        result = _masked_target_log_probs(self.model, *batch, masked_B1, targets_B1)
        log_probs.append(np.asarray(result)[:, 0])
      out.append(np.concatenate(log_probs))
    return out

  def embed(self, texts: str | Sequence[str], pooling: str | None = None) -> np.ndarray:
    """float32 [len(texts), width]: the final hidden states of encode(text) pooled by 'mean'
    (every position, special tokens included), 'cls' (BERT's [CLS]) or 'last' (the last
    position: for GPT the only one that has read the whole text; for BERT its [SEP]).
    Default: 'last' for GPT, 'mean' for BERT."""
    pooling = pooling or ("last" if self.model_cfg.causal else "mean")
    if pooling not in POOLINGS:
      raise UsageError(f"pooling={pooling!r}: use one of {', '.join(POOLINGS)}.")
    if pooling == "cls" and self.model_cfg.causal:
      raise UsageError(
        "pooling='cls' is BERT's; a GPT's first position has read only BOS. Use 'last' or 'mean'."
      )
    rows = [self._fit(self.encode(t), t) for t in _as_list(texts)]
    if not rows:
      return np.zeros((0, self.model_cfg.emb_dim), np.float32)
    out = []
    for chunk in _chunks(rows):
      hidden_BTD = np.asarray(_hidden(self.model, *_padded(chunk, self.model_cfg.max_len)))
      for i, row in enumerate(chunk):
        h_TD = hidden_BTD[i, : len(row)].astype(np.float32)
        out.append({"mean": h_TD.mean(0), "cls": h_TD[0], "last": h_TD[-1]}[pooling])
    return np.stack(out)
