"""SentencePiece's model file (sentencepiece_model.proto): the fields sslm_jax reads, described
here rather than through sentencepiece's generated code.

That generated code demands the protobuf runtime it was generated for (7.x for sentencepiece
0.2.3), while Apache Beam, the optional preparation runner, needs protobuf below 7. A
description built at import time works with any protobuf runtime. Field numbers, types and
defaults are sentencepiece's own; fields not described here are kept as unknown fields, so a
model parsed, changed and serialized again loses nothing.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "sslm_jax.sentencepiece"


def _enum(parent, name: str, values: dict[str, int]) -> None:
  enum = parent.enum_type.add(name=name)
  for value_name, number in values.items():
    enum.value.add(name=value_name, number=number)


def _field(message, name: str, number: int, kind, *, type_name="", default=None, repeated=False):
  label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
  field = message.field.add(name=name, number=number, type=kind, label=label)
  if type_name:
    field.type_name = f".{_PACKAGE}.{type_name}"
  if default is not None:
    field.default_value = default


def _file() -> descriptor_pb2.FileDescriptorProto:
  f = descriptor_pb2.FileDescriptorProto(
    name="sslm_jax/sentencepiece_model.proto", package=_PACKAGE, syntax="proto2"
  )
  trainer = f.message_type.add(name="TrainerSpec")
  _enum(trainer, "ModelType", {"UNIGRAM": 1, "BPE": 2, "WORD": 3, "CHAR": 4})
  _field(
    trainer, "model_type", 3, _F.TYPE_ENUM, type_name="TrainerSpec.ModelType", default="UNIGRAM"
  )
  _field(trainer, "treat_whitespace_as_suffix", 24, _F.TYPE_BOOL, default="false")
  _field(trainer, "byte_fallback", 35, _F.TYPE_BOOL, default="false")

  normalizer = f.message_type.add(name="NormalizerSpec")
  _field(normalizer, "name", 1, _F.TYPE_STRING)
  _field(normalizer, "precompiled_charsmap", 2, _F.TYPE_BYTES)
  _field(normalizer, "add_dummy_prefix", 3, _F.TYPE_BOOL, default="true")
  _field(normalizer, "remove_extra_whitespaces", 4, _F.TYPE_BOOL, default="true")
  _field(normalizer, "escape_whitespaces", 5, _F.TYPE_BOOL, default="true")

  model = f.message_type.add(name="ModelProto")
  piece = model.nested_type.add(name="SentencePiece")
  types = {"NORMAL": 1, "UNKNOWN": 2, "CONTROL": 3, "USER_DEFINED": 4, "BYTE": 6, "UNUSED": 5}
  _enum(piece, "Type", types)
  _field(piece, "piece", 1, _F.TYPE_STRING)
  _field(piece, "score", 2, _F.TYPE_FLOAT)
  _field(
    piece, "type", 3, _F.TYPE_ENUM, type_name="ModelProto.SentencePiece.Type", default="NORMAL"
  )
  _field(model, "pieces", 1, _F.TYPE_MESSAGE, type_name="ModelProto.SentencePiece", repeated=True)
  _field(model, "trainer_spec", 2, _F.TYPE_MESSAGE, type_name="TrainerSpec")
  _field(model, "normalizer_spec", 3, _F.TYPE_MESSAGE, type_name="NormalizerSpec")
  _field(model, "denormalizer_spec", 5, _F.TYPE_MESSAGE, type_name="NormalizerSpec")
  return f


_POOL = descriptor_pool.DescriptorPool()  # our own pool: no clash with sentencepiece's names
_POOL.Add(_file())
ModelProto = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.ModelProto"))
