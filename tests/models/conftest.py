"""Model tests run the ops' plain-PyTorch references on the CPU.

``tests/conftest.py`` turns on Triton's interpreter for the op tests; a whole model through the
interpreter would take minutes, and the ops' kernels are tested in ``tests/ops``. The dispatch rule
(``bevdeploy.ops._utils.interpreter_enabled``) reads the variable at call time, so unsetting it
here routes CPU tensors to the references.
"""

import pytest


@pytest.fixture(autouse=True)
def _ops_on_references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
