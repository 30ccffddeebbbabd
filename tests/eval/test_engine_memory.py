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


def test_stack_release_off_cuda_is_a_no_op(tiny_engine, ops_on_references):
    """Without a CUDA context there is no stack reservation: the readers say None, the engine's release
    does nothing, and the child asked for the release step returns the plain readings."""
    from bevdeploy.engine.cuda_stack import set_stack_limit_bytes, stack_limit_bytes

    assert stack_limit_bytes() is None and set_stack_limit_bytes(1024) is None
    with pytest.raises(ValueError, match="int >= 0 bytes"):
        set_stack_limit_bytes(-1)
    assert Engine.load(tiny_engine, device="cpu").release_stack() is None
    r = fresh_process_memory(tiny_engine, _inputs(), iters=1, device="cpu", stack_release=True)
    assert r["ms"] > 0 and "stack_limit_kb" not in r and "stack_release_error" not in r


def test_a_failed_stack_release_keeps_the_readings_before_it(monkeypatch, tmp_path):
    """The child prints its readings before the release step; if that step kills it, the parent keeps them
    and names the failure (without the step, a failed child is an error as before)."""
    import json
    import subprocess

    reading = {"device_used_mb": None, "allocated_mb": None, "peak_allocated_mb": None, "reserved_mb": None,
               "ms": 1.5, "context_mb": None, "loaded_mb": None, "outputs": ["x"]}

    def died_after_readings(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, stdout=json.dumps(reading) + "\n", stderr="illegal address")

    monkeypatch.setattr(subprocess, "run", died_after_readings)
    r = fresh_process_memory(tmp_path / "e.engine", {}, iters=1, device="cpu", stack_release=True)
    assert r["ms"] == 1.5 and "illegal address" in r["stack_release_error"]
    with pytest.raises(RuntimeError, match="failed \\(exit 1\\)"):
        fresh_process_memory(tmp_path / "e.engine", {}, iters=1, device="cpu")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_stack_limit_reads_and_sets_the_context_limit():
    import torch

    from bevdeploy.engine.cuda_stack import reservation_mb, set_stack_limit_bytes, stack_limit_bytes

    torch.zeros(1, device="cuda")  # the context
    before = stack_limit_bytes()
    try:
        assert set_stack_limit_bytes(4096) >= 4096  # the driver may round up
        props = torch.cuda.get_device_properties(0)
        assert reservation_mb(4096) == 4096 * props.multi_processor_count * props.max_threads_per_multi_processor / 2**20
    finally:
        set_stack_limit_bytes(before)
    assert stack_limit_bytes() == before
