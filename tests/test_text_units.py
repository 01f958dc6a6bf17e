"""A large text file is cut into byte-range units (data/units.py) without changing the cache."""

import json
import os
import random

import numpy as np
import pytest
from test_data import make_config, words

from sslm_jax.data import corpus, pipeline, preparation, units


def _write_corpus(root) -> str:
  rng = random.Random(0)
  root.mkdir()
  paragraphs = []
  for i in range(400):
    gap = ("\n\n", "\n  \n\n", "\n\t\n")[i % 3]  # blank lines with and without whitespace
    lines = "\n".join(words(rng, rng.randint(3, 15)) for _ in range(rng.randint(1, 4)))
    paragraphs.append(lines + gap)
  paragraphs[200] = "x" * 5000 + "\n\n"  # one paragraph over MAX_DOC_BYTES (patched below)
  (root / "big.txt").write_text("".join(paragraphs))
  records = [json.dumps({"text": words(rng, rng.randint(5, 30))}) for _ in range(300)]
  (root / "big.jsonl").write_text("\n".join(records[:150]) + "\n\n" + "\n".join(records[150:]))
  return str(root / "big.*")


def _rows(workdir) -> dict[str, np.ndarray]:
  data = os.path.join(workdir, "data")
  meta = json.load(open(os.path.join(data, "meta.json")))
  out = {}
  for split in units.SPLITS:
    parts = [
      np.fromfile(os.path.join(data, name), meta["dtype"]) for name, _ in meta[split]["shards"]
    ]
    out[split] = np.concatenate(parts).reshape(-1, meta["row_len"])
  return out | {"sizes": [meta[s][k] for s in units.SPLITS for k in ("docs", "tokens", "rows")]}


def test_cutting_files_into_byte_ranges_keeps_documents_rows_and_batches(tmp_path, monkeypatch):
  monkeypatch.setattr(corpus, "MAX_DOC_BYTES", 2048)
  c = make_config(_write_corpus(tmp_path / "corpus"), augment="swap:p=0.5", shard_rows=20)
  whole = units.units(c)
  assert [u.byte_range for u in whole] == [None, None]
  preparation.build_cache(c, str(tmp_path / "whole"))

  monkeypatch.setattr(units, "TEXT_BYTES_PER_UNIT", 1500)
  cut = units.units(c)
  assert len(cut) > 20 and all(u.size < 1500 + 6000 for u in cut)
  assert cut == units.units(c)  # a pure function of the bytes and the unit size
  for u in cut:  # ranges start after a blank line (.txt) or at a line (.jsonl)
    if u.byte_range and u.byte_range[0]:
      with open(u.files[0][1], "rb") as f:
        f.seek(u.byte_range[0] - 1)
        assert f.read(1) == b"\n"
  c.data.tokenizer_path = str(tmp_path / "whole" / "tokenizer.model")
  preparation.build_cache(c, str(tmp_path / "cut"))

  expected, got = _rows(tmp_path / "whole"), _rows(tmp_path / "cut")
  assert got["sizes"] == expected["sizes"]
  for split in units.SPLITS:
    np.testing.assert_array_equal(got[split], expected[split])
  for step in (0, 3):
    np.testing.assert_array_equal(
      pipeline.build(c, str(tmp_path / "cut")).batch_for_step(step)["inputs"],
      pipeline.build(c, str(tmp_path / "whole")).batch_for_step(step)["inputs"],
    )


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl"])
def test_a_unit_cut_begins_where_the_reader_is_between_documents(tmp_path, name):
  path = tmp_path / name
  path.write_bytes(b"aaaa\nbb\n \ncc\n\ndd\n")
  cuts = [corpus.unit_cut(str(path), t) for t in range(len(path.read_bytes()) + 1)]
  if name.endswith(".jsonl"):  # every line start
    assert sorted(set(cuts) - {None}) == [5, 8, 10, 13, 14, 17]
  else:  # after a blank line: " \n" ends at 10, "\n" at 14
    assert sorted(set(cuts) - {None}) == [10, 14]
    assert cuts[11] == 14 and cuts[15] is None
