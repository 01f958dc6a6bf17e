"""SentencePiece tokenizer: training, loading and the fixed special ids both objectives share.

This module stays free of TensorFlow so that training and sampling code can use it on machines
where only JAX is installed. Files are read and written through `etils.epath`, which also
understands gs:// paths.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from etils import epath

from sslm_jax.errors import SslmError

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID, SEP_ID = 0, 1, 2, 3, 4, 5, 6
NUM_SPECIAL = 7
SPECIAL_IDS = frozenset(range(NUM_SPECIAL))
# Control symbols (not user-defined ones): a literal "[CLS]" in the corpus must stay ordinary text,
# or it would fake a document boundary or a mask.
CONTROL_SYMBOLS = ("[MASK]", "[CLS]", "[SEP]")  # at ids MASK_ID, CLS_ID, SEP_ID

# The trainer skips longer sentences silently, so training text is cut into chunks below this.
_MAX_CHUNK_CHARS = 2000
_MAX_SENTENCE_BYTES = 4 * _MAX_CHUNK_CHARS + 16
# A fixed thread count keeps the trained model identical on machines with different core counts
# (the EM statistics are summed per thread).
_TRAIN_THREADS = 8
_SPACE = "\u2581"  # SentencePiece's visible space


class TokenizerError(SslmError, ValueError):
  """A tokenizer that cannot be trained or used; the message names the problem and the fix."""


class Tokenizer:
  """A loaded SentencePiece model plus the facts the data pipeline and metrics need.

  The special ids are attributes (as on `hf_json.HFTokenizer`, which the pipeline can use
  instead); here they are always the module constants.
  """

  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
  mask_id, cls_id, sep_id = MASK_ID, CLS_ID, SEP_ID
  special_ids = SPECIAL_IDS

  def __init__(self, model_proto: bytes, path: str):
    self.path = str(path)
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except (RuntimeError, OSError) as e:
      raise TokenizerError(
        f"tokenizer file {self.path} is not a valid SentencePiece model ({e}); replace it, or "
        "delete it and leave data.tokenizer_path empty to train a new one."
      ) from e
    self.sha256 = hashlib.sha256(model_proto).hexdigest()
    self.vocab_size = int(self._sp.get_piece_size())
    self._token_bytes: np.ndarray | None = None

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Ids of each text, without BOS/EOS; one call so SentencePiece can use its threads."""
    return self._sp.encode(list(texts), out_type=int)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids) -> str:
    """Text of `ids`, skipping special ids and ids beyond the vocab (padded model outputs)."""
    keep = [int(i) for i in ids if NUM_SPECIAL <= int(i) < self.vocab_size]
    return self._sp.decode(keep)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def token_bytes(self) -> np.ndarray:
    """int32 [vocab_size]: UTF-8 bytes of the text each id stands for (0 for special ids).

    The visible space counts as one byte and a byte-fallback piece as one byte. The space
    SentencePiece puts in front of every encoded text is counted too, so an encoded text of n
    bytes sums to n + 1 (target_bytes removes it).
    """
    if self._token_bytes is None:
      counts = np.zeros(self.vocab_size, np.int32)
      for i in range(NUM_SPECIAL, self.vocab_size):
        if self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i):
          continue
        if self._sp.is_byte(i):
          counts[i] = 1
        else:
          counts[i] = len(self._sp.id_to_piece(i).replace(_SPACE, " ").encode("utf-8"))
      self._token_bytes = counts
    return self._token_bytes

  def target_bytes(self, inputs_bT: np.ndarray, targets_bT: np.ndarray, start_id: int):
    """int32: UTF-8 bytes of the original text each target token stands for.

    A document's first piece carries the space SentencePiece adds in front of every encoded
    text (the input before it is `start_id`); that byte is not in the text, so it is not
    counted. Special ids (EOS) stand for no bytes.
    """
    bytes_bT = self.token_bytes()[targets_bT].astype(np.int32)
    if self._adds_prefix_space():
      first_bT = (inputs_bT == start_id) & (bytes_bT > 0)
      bytes_bT = bytes_bT - first_bT.astype(np.int32)
    return bytes_bT

  def _adds_prefix_space(self) -> bool:
    pieces = self._sp.encode("a", out_type=str)
    return bool(pieces) and pieces[0].startswith(_SPACE)


def _check_layout(tok: Tokenizer) -> None:
  """A model made elsewhere must use our special ids, or batches would mean something else."""
  sp = tok._sp
  found = {
    "pad": sp.pad_id(),
    "unk": sp.unk_id(),
    "bos": sp.bos_id(),
    "eos": sp.eos_id(),
    **{sym: sp.piece_to_id(sym) for sym in CONTROL_SYMBOLS},
  }
  wanted = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
  wanted.update(zip(CONTROL_SYMBOLS, (MASK_ID, CLS_ID, SEP_ID), strict=True))
  wrong = {k: v for k, v in found.items() if wanted[k] != v}
  if wrong:
    raise TokenizerError(
      f"tokenizer {tok.path} uses other special ids than sslm_jax needs: found {found}, "
      f"need {wanted} (pad/unk/bos/eos at 0-3, then [MASK],[CLS],[SEP] at 4-6). Leave "
      "data.tokenizer_path empty to train a compatible one, or retrain yours with pad_id=0 "
      "unk_id=1 bos_id=2 eos_id=3 control_symbols=[MASK],[CLS],[SEP]."
    )


def load(path: str) -> Tokenizer:
  """Load a SentencePiece model from a local or remote path and check its special ids.

  `tokenizer.files.load` picks this or `hf_json.load` by the file's type.
  """
  p = epath.Path(path)
  if not p.exists():
    raise TokenizerError(
      f"tokenizer file {path} does not exist; fix data.tokenizer_path or leave it empty to "
      "train one."
    )
  tok = Tokenizer(p.read_bytes(), str(path))
  _check_layout(tok)
  return tok


def _chunks(texts: Iterable[str]) -> Iterator[str]:
  """Groups of whole lines, so newlines and indentation can become pieces.

  Lines longer than a chunk are cut, because the trainer drops over-long sentences.
  """
  for text in texts:
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
      for start in range(0, len(line), _MAX_CHUNK_CHARS):
        part = line[start : start + _MAX_CHUNK_CHARS]
        if size + len(part) > _MAX_CHUNK_CHARS and buf:
          yield "".join(buf)
          buf, size = [], 0
        buf.append(part)
        size += len(part)
    if buf:
      yield "".join(buf)


def _train_error(e: RuntimeError, vocab_size: int) -> TokenizerError:
  msg = str(e)
  too_high = re.search(r"Vocabulary size too high.*?<=\s*(\d+)", msg)
  if too_high:
    return TokenizerError(
      f"data.vocab_size={vocab_size} is larger than the tokenizer corpus supports (at most "
      f"{too_high.group(1)}); use --config.data.vocab_size={too_high.group(1)} or less, or a "
      "larger corpus / data.tokenizer_sample_bytes."
    )
  too_low = re.search(r"smaller than required_chars\. *\d+ vs (\d+)", msg)
  if too_low:
    return TokenizerError(
      f"data.vocab_size={vocab_size} is too small: the 256 byte pieces, 7 special ids and the "
      f"corpus characters need {too_low.group(1)}; use --config.data.vocab_size="
      f"{too_low.group(1)} or more."
    )
  if "sentences_.empty()" in msg:
    return TokenizerError(
      "the tokenizer training sample has no text; check the data source (data.source, "
      "data.text_files) and data.tokenizer_sample_bytes > 0."
    )
  return TokenizerError(f"SentencePiece training failed ({msg}); check the corpus and vocab size.")


def write_atomically(path: epath.Path, data: bytes) -> None:
  """Write to a temporary name beside `path`, then rename, so readers never see a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.write_bytes(data)
  tmp.replace(path)


def train(texts: Iterable[str], vocab_size: int, model_path: str) -> Tokenizer:
  """Train a unigram model with byte fallback and our special ids; write it to `model_path`."""
  writer = io.BytesIO()
  spm.set_random_generator_seed(0)
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=_chunks(texts),
      model_writer=writer,
      vocab_size=vocab_size,
      model_type="unigram",
      byte_fallback=True,
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      control_symbols=list(CONTROL_SYMBOLS),
      character_coverage=0.9995,
      # Keep text byte-exact (code indentation, bits-per-byte): no NFKC, no space folding.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      max_sentence_length=_MAX_SENTENCE_BYTES,
      shuffle_input_sentence=False,
      num_threads=_TRAIN_THREADS,
      minloglevel=2,
    )
  except RuntimeError as e:
    raise _train_error(e, vocab_size) from e
  proto = writer.getvalue()
  write_atomically(epath.Path(model_path), proto)
  return Tokenizer(proto, str(model_path))
