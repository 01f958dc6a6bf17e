"""The Python a user copies from docs/ runs as written."""

import pathlib
import re

from sslm_jax.config import defaults

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def _python_blocks(page: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def test_the_mixture_snippet_of_data_md_builds_a_mixture():
  [snippet] = [b for b in _python_blocks("data.md") if "mixture" in b]
  c = defaults()
  exec(snippet, {"c": c})
  assert sorted(c.data.mixture) == ["web", "wiki"]
  assert c.data.mixture.web.weight == 0.7 and c.data.mixture.wiki.tfds_name == "wiki40b/en"
