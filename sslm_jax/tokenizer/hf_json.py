"""Hugging Face tokenizer files: our tokenizer exported as tokenizer.json, and theirs loaded.

`load` reads a tokenizer.json (GPT-2 byte-level BPE, BERT WordPiece, ...) as an `HFTokenizer`,
which the data pipeline uses like our SentencePiece `sentencepiece.Tokenizer`.

`save` writes what `transformers.AutoTokenizer.from_pretrained(out_dir)` and
`tokenizers.Tokenizer.from_file(out_dir / "tokenizer.json")` need to reproduce our SentencePiece
encoding: a Unigram model with the same pieces, scores and byte fallback, and the normalizer and
decoder that mirror SentencePiece's dummy prefix and visible space. Built with `tokenizers` alone;
transformers is not needed to write the files.

Two deliberate differences from SentencePiece, both about text that spells a special piece:
- A literal "[MASK]", "<s>", ... in the text is one special id here (what Hugging Face pipelines
  such as fill-mask rely on) and plain text in SentencePiece. Load with
  `split_special_tokens=True` to encode it as text, as SentencePiece does. In a masked_lm
  export "[MASK]" stands for one piece together with the space before it, as a masked '▁word'
  piece did in training and as `api.LanguageModel.fill_mask` reads it: "an [MASK] of" is
  '▁an', [MASK], '▁of', and the text after a [MASK] gets no second dummy-prefix space. Read as
  text, a "[MASK]" that follows no space is therefore encoded with one before it.
- Byte-fallback and special pieces get a score no segmentation prefers, so a literal "<0x41>" in
  the text stays text. Characters outside the vocabulary take the same byte pieces in every
  segmentation, so the lower unknown-piece score this implies changes no choice.
Segmentations whose scores tie (SentencePiece sums in float32, tokenizers in float64) may still
split differently; the text decodes back exactly either way.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import tokenizers
from etils import epath
from tokenizers import AddedToken, decoders, models, normalizers, processors

from sslm_jax.tokenizer import sentencepiece as tokenizer_lib
from sslm_jax.tokenizer.sp_model import ModelProto

_SPACE = "\u2581"  # SentencePiece's visible space
_Piece = ModelProto.SentencePiece
# Below any sum of real piece scores over the few characters these pieces spell.
_UNREACHABLE_SCALE = 1000.0
OBJECTIVES = ("causal_lm", "masked_lm")


def _model_proto(tok: tokenizer_lib.Tokenizer) -> bytes:
  proto = epath.Path(tok.path).read_bytes()
  if tokenizer_lib.Tokenizer(proto, tok.path).sha256 != tok.sha256:
    raise tokenizer_lib.TokenizerError(
      f"{tok.path} changed since the tokenizer was loaded; load it again before exporting."
    )
  return proto


def _check_exportable(m: ModelProto, path: str) -> None:
  """The normalizer and decoder below mirror only the settings tokenizer.train uses."""
  norm, spec = m.normalizer_spec, m.trainer_spec
  found = {
    "model_type": spec.model_type == spec.UNIGRAM,
    "byte_fallback": spec.byte_fallback,
    "identity normalization": not norm.precompiled_charsmap,
    "add_dummy_prefix": norm.add_dummy_prefix,
    "remove_extra_whitespaces=False": not norm.remove_extra_whitespaces,
    "escape_whitespaces": norm.escape_whitespaces,
    "treat_whitespace_as_suffix=False": not spec.treat_whitespace_as_suffix,
    "no denormalizer": not m.denormalizer_spec.precompiled_charsmap,
  }
  missing = [k for k, ok in found.items() if not ok]
  if missing:
    raise tokenizer_lib.TokenizerError(
      f"tokenizer {path} cannot be exported exactly: it lacks {missing}. Only unigram models "
      "trained with sslm_jax's settings (tokenizer.train) can be written as tokenizer.json."
    )


def _post_processor(objective: str) -> processors.TemplateProcessing:
  """How training framed documents: <s> text (causal; no </s>, so generation continues after
  the prompt), [CLS] text [SEP] (masked)."""
  if objective == "causal_lm":
    bos, eos = "<s>", "</s>"
    ids = [(bos, tokenizer_lib.BOS_ID), (eos, tokenizer_lib.EOS_ID)]
    return processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {eos} {bos} $B", special_tokens=ids
    )
  cls, sep = "[CLS]", "[SEP]"
  ids = [(cls, tokenizer_lib.CLS_ID), (sep, tokenizer_lib.SEP_ID)]
  return processors.TemplateProcessing(
    single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=ids
  )


def build(tok: tokenizer_lib.Tokenizer, *, objective: str) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` that encodes and decodes as `tok` does (see the module notes)."""
  return _build(_model_proto(tok), tok.path, objective)


def _build(proto: bytes, path: str, objective: str) -> tokenizers.Tokenizer:
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
  m = ModelProto.FromString(proto)
  _check_exportable(m, path)
  normal = [p.score for p in m.pieces if p.type == _Piece.NORMAL]
  unreachable = _UNREACHABLE_SCALE * min(min(normal, default=-1.0), -1.0)
  vocab = [
    (p.piece, p.score if p.type in (_Piece.NORMAL, _Piece.USER_DEFINED) else unreachable)
    for p in m.pieces
  ]
  hf = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=tokenizer_lib.UNK_ID, byte_fallback=True))
  steps = [normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)]
  if objective == "masked_lm":
    mask = m.pieces[tokenizer_lib.MASK_ID].piece
    # The whole text is normalized at once (the mask token is matched after normalization), so
    # only its start gets the dummy prefix, and the mask token, itself normalized to
    # '▁[MASK]', takes the space before it; one that follows no space is given one.
    steps.append(
      normalizers.Replace(tokenizers.Regex(f"{_SPACE}?{re.escape(mask)}"), _SPACE + mask)
    )
  hf.normalizer = normalizers.Sequence(steps)
  # Fuse before Strip: Strip works on each token, and only the text's first space is the prefix.
  hf.decoder = decoders.Sequence(
    [
      decoders.Replace(_SPACE, " "),
      decoders.ByteFallback(),
      decoders.Fuse(),
      decoders.Strip(" ", 1, 0),
    ]
  )
  specials = [m.pieces[i].piece for i in range(tokenizer_lib.NUM_SPECIAL)]
  normalized = {tokenizer_lib.MASK_ID} if objective == "masked_lm" else set()
  hf.add_special_tokens(
    [AddedToken(s, special=True, normalized=i in normalized) for i, s in enumerate(specials)]
  )
  hf.post_processor = _post_processor(objective)
  return hf


def _special_tokens(tok, objective: str) -> dict[str, str]:
  roles = ["unk", "pad"] + (["bos", "eos"] if objective == "causal_lm" else ["cls", "sep", "mask"])
  ids = {f"{r}_token": getattr(tok, f"{r}_id") for r in roles}
  return {name: tok.id_to_piece(i) for name, i in ids.items() if i is not None}


def save(tok, out_dir, *, objective: str, max_len: int | None = None) -> None:
  """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and, for our
  SentencePiece `tok`, tokenizer.model. An `HFTokenizer`'s own tokenizer.json is copied.

  `out_dir` must exist. `max_len` (the model's context length) becomes model_max_length.
  """
  out = epath.Path(out_dir)
  if not out.is_dir():
    raise FileNotFoundError(f"export directory {out_dir} does not exist; create it first.")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
  if isinstance(tok, HFTokenizer):
    proto, tokenizer_json = None, epath.Path(tok.path).read_bytes()
  else:
    proto = _model_proto(tok)
    tokenizer_json = _build(proto, tok.path, objective).to_str(pretty=True).encode("utf-8")
  # As tokenizer.json matches each one: transformers re-adds the tokens listed here.
  normalized = {
    t["id"] for t in json.loads(tokenizer_json).get("added_tokens", []) if t.get("normalized")
  }
  specials = _special_tokens(tok, objective)
  added = {
    str(i): {
      "content": tok.id_to_piece(i),
      "lstrip": False,
      "normalized": i in normalized,
      "rstrip": False,
      "single_word": False,
      "special": True,
    }
    for i in sorted(tok.special_ids)
  }
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "added_tokens_decoder": added}
  if proto is not None:
    # Our decoding is exact; transformers' clean-up would drop spaces before punctuation.
    config["clean_up_tokenization_spaces"] = False
  if max_len is not None:
    config["model_max_length"] = int(max_len)
  (out / "tokenizer.json").write_bytes(tokenizer_json)
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
  (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False))
  if proto is not None:
    (out / "tokenizer.model").write_bytes(proto)
  elif (out / "tokenizer.model").exists():  # an earlier export's, which this tokenizer is not
    (out / "tokenizer.model").unlink()


# ----------------------------------------------------------------------------- loading

# Special token spellings per role, first match wins. GPT-2 has one token for both document
# ends; BERT has no bos/eos; RoBERTa spells cls/sep as <s> and </s>.
_ROLES = {
  "bos_id": ("<s>", "<|endoftext|>", "<|begin_of_text|>"),
  "eos_id": ("</s>", "<|endoftext|>", "<|end_of_text|>"),
  "pad_id": ("<pad>", "[PAD]", "<|padding|>"),
  "unk_id": ("<unk>", "[UNK]", "<|unk|>"),
  "mask_id": ("[MASK]", "<mask>"),
  "cls_id": ("[CLS]", "<s>"),
  "sep_id": ("[SEP]", "</s>"),
}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class HFTokenizer:
  """A Hugging Face tokenizer.json behind the interface the data pipeline uses from
  `sentencepiece.Tokenizer`: encode, encode_batch, decode, vocab_size, sha256, path, id_to_piece,
  token_bytes / target_bytes and the special ids as attributes (None where the vocabulary has no
  such token; pad_id falls back to eos_id, as GPT-2 users do).

  Special tokens spelled out in a document are encoded as text, never as special ids, so a
  literal "<|endoftext|>" cannot fake a document boundary.
  """

  def __init__(self, json_bytes: bytes, path: str):
    self.path = str(path)
    try:
      json_text = json_bytes.decode("utf-8")
      self._hf = tokenizers.Tokenizer.from_str(json_text)
      spec = json.loads(json_text)
    except Exception as e:  # tokenizers raises plain Exception for malformed files
      raise tokenizer_lib.TokenizerError(
        f"tokenizer file {self.path} is not a valid Hugging Face tokenizer.json ({e})."
      ) from e
    self._hf.encode_special_tokens = True
    self.sha256 = hashlib.sha256(json_bytes).hexdigest()
    self.vocab_size = int(self._hf.get_vocab_size(with_added_tokens=True))
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    self.special_ids = frozenset(specials.values())
    for role, spellings in _ROLES.items():
      setattr(self, role, next((specials[s] for s in spellings if s in specials), None))
    if self.pad_id is None:
      self.pad_id = self.eos_id
    self._model_type = (spec.get("model") or {}).get("type")
    self._decoder_types = _types(spec.get("decoder"))
    self._token_bytes: np.ndarray | None = None
    self._prefix_byte: bool | None = None

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Ids of each text, without special tokens."""
    return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

  def encode(self, text: str) -> list[int]:
    return self._hf.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    """Text of `ids`, skipping special ids and ids beyond the vocab (padded model outputs)."""
    keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    return self._hf.decode([i for i in keep if i not in self.special_ids])

  def id_to_piece(self, i: int) -> str:
    return self._hf.id_to_token(int(i))

  def _piece_bytes(self, piece: str) -> int:
    if "ByteLevel" in self._decoder_types:
      return len(piece)  # one character of the byte-level alphabet per byte
    if self._model_type == "WordPiece":
      # A word's first piece stands for the space before it too (the prefix is removed below).
      if piece.startswith("##"):
        return len(piece[2:].encode("utf-8"))
      return len(piece.encode("utf-8")) + 1
    if _BYTE_PIECE.fullmatch(piece):
      return 1
    return len(piece.replace(_SPACE, " ").encode("utf-8"))

  def token_bytes(self) -> np.ndarray:
    """int32 [vocab_size]: UTF-8 bytes of the text each id stands for (0 for special ids).

    Exact for byte-level BPE and SentencePiece-style vocabularies; for WordPiece, which drops
    whitespace and may normalize, it counts one space before each word (not before
    punctuation-split pieces, so an approximation).
    """
    if self._token_bytes is None:
      counts = np.zeros(self.vocab_size, np.int32)
      for i in range(self.vocab_size):
        if i not in self.special_ids:
          counts[i] = self._piece_bytes(self.id_to_piece(i) or "")
      self._token_bytes = counts
    return self._token_bytes

  def target_bytes(self, inputs_bT: np.ndarray, targets_bT: np.ndarray, start_id: int):
    """int32: UTF-8 bytes of the text each target stands for; a document's first piece does not
    count a leading space the tokenizer adds (as in `sentencepiece.Tokenizer.target_bytes`)."""
    bytes_bT = self.token_bytes()[targets_bT].astype(np.int32)
    if self._prefix_byte is None:
      self._prefix_byte = int(self.token_bytes()[self.encode("a")].sum()) > 1
    if self._prefix_byte:
      bytes_bT = bytes_bT - ((inputs_bT == start_id) & (bytes_bT > 0)).astype(np.int32)
    return bytes_bT


def _types(decoder: dict | None) -> set[str]:
  """The types in a decoder spec, through nested Sequence decoders."""
  if not decoder:
    return set()
  found = {decoder.get("type")}
  for child in decoder.get("decoders", []):
    found |= _types(child)
  return found


def load(path: str) -> HFTokenizer:
  """Load a tokenizer.json from a local or remote path."""
  p = epath.Path(path)
  if not p.exists():
    raise tokenizer_lib.TokenizerError(
      f"tokenizer file {path} does not exist; fix data.tokenizer_path."
    )
  return HFTokenizer(p.read_bytes(), str(path))
