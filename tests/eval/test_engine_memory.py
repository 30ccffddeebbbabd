"""``fresh_process_memory``: the engine loaded and run in a child process (the GPU readings are the device's;
on the CPU the same child runs without them), and a child's failure surfaces with its reason."""

import pytest

from bevdeploy.engine import Engine, build
from bevdeploy.eval.engine_memory import fresh_process_memory
from tests._utils import ops_on_references_here
from tests.engine.test_engine import TINY, _inputs


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    with ops_on_references_here():
        return build("bevformer-tiny", "fp32", out=tmp_path_factory.mktemp("mem") / "tiny.engine",
                     model_overrides=TINY, progress=False)


def test_child_loads_and_runs_the_engine(tiny_engine, ops_on_references):
    r = fresh_process_memory(tiny_engine, _inputs(), iters=2, device="cpu")
    assert r["outputs"] == sorted(Engine.load(tiny_engine, device="cpu").output_names)
    assert r["ms"] > 0 and r["memory_mb"] is None and r["context_mb"] is None


def test_child_failure_names_the_engine_and_the_reason(tiny_engine, tmp_path, ops_on_references):
    bad = tmp_path / "bad.engine"
    bad.write_bytes(tiny_engine.read_bytes()[:1000])  # truncated
    with pytest.raises(RuntimeError, match="bad.engine failed") as e:
        fresh_process_memory(bad, _inputs(), iters=1, device="cpu")
    assert "not a readable bevdeploy engine file" in str(e.value)  # the child's own error, passed on
    wrong = dict(_inputs(), image=_inputs()["image"][:, :2])  # two cameras for a six-camera engine
    with pytest.raises(RuntimeError, match="image must have shape"):
        fresh_process_memory(tiny_engine, wrong, iters=1, device="cpu")
