"""Test set-up: Triton kernels run through Triton's interpreter on the CPU.

``TRITON_INTERPRET`` is read when kernels are decorated, so it is set here, before any bevdeploy
import. On a CUDA machine it stays off (kernels compile for the GPU); set
``BEVDEPLOY_TEST_INTERPRET=0`` to test the CPU reference paths alone.
"""

import os

import torch

if not torch.cuda.is_available() and os.environ.get("BEVDEPLOY_TEST_INTERPRET", "1") == "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

# Decorate every Triton kernel now, while the setting above holds: fixtures that later route ops to
# the references (TRITON_INTERPRET=0 at call time) must not be the first to import a kernel module.
import bevdeploy.engine.image_layout  # noqa: E402,F401
import bevdeploy.ops  # noqa: E402,F401
import bevdeploy.quant.int8_kernels  # noqa: E402,F401
from bevdeploy.ops._utils import FAKE_LAYOUT_VERSION  # noqa: E402

# Inductor's shared FX-graph cache (/tmp/torchinductor_<user>) does not key on our ops' fakes: a
# checkout whose fakes promise other strides would reuse another checkout's compiled graphs.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_bevdeploy_ops{FAKE_LAYOUT_VERSION}")


@pytest.fixture
def device() -> torch.device:
    """Where kernels under test run: the GPU if there is one, else the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def ops_on_references(monkeypatch):
    """Route CPU tensors to the ops' plain-PyTorch references (whole models through the interpreter
    would take minutes; the kernels themselves are tested in tests/ops). The dispatch rule reads
    ``TRITON_INTERPRET`` at call time, so unsetting it here is enough."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
