"""The Examples sections of the model classes run as written.

Each run of ``>>>`` lines is one example; the examples of a class run in order in one
namespace. Examples that load published weights (``from_pretrained``) need the checkpoint
files, which are not part of the test data, and are left out.
"""

from __future__ import annotations

import inspect

import pytest
import scvi

from cellformers.model import SCBERT, SCGPT, Geneformer, SCFoundation


def _examples(cls) -> list[str]:
    """The code of each example in the class docstring's Examples section."""
    section = inspect.getdoc(cls).split("Examples\n--------\n", 1)[1]
    examples, current = [], []
    for line in [*section.splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith((">>>", "...")):
            current.append(stripped[4:])
        elif current:
            examples.append("\n".join(current))
            current = []
    return examples


@pytest.mark.parametrize("cls", [SCGPT, Geneformer, SCBERT, SCFoundation], ids=lambda c: c.__name__)
def test_class_examples_run(cls, monkeypatch):
    monkeypatch.setattr(scvi.settings, "seed", 0)
    examples = [code for code in _examples(cls) if "from_pretrained(" not in code]
    assert examples, f"{cls.__name__} has no example that runs without published weights"
    namespace: dict = {}
    for code in examples:
        exec(compile(code, f"<{cls.__name__} example>", "exec"), namespace)
    assert namespace["model"].is_trained_
