"""scripts/engine_memory_env.py: each variant runs the engine in a fresh process with its environment (checked
here through a variable the child reports), and the table is written after every variant."""

import importlib.util
import json
from pathlib import Path

import pytest

from bevdeploy.eval import engine_memory
from tests.eval.test_engine_memory import tiny_engine  # noqa: F401  (the module-scoped engine fixture)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "engine_memory_env.py"


def _script():
    spec = importlib.util.spec_from_file_location("engine_memory_env", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variants_run_in_fresh_processes_with_their_environment(tiny_engine, tmp_path, monkeypatch,  # noqa: F811
                                                                 ops_on_references):
    mod = _script()
    seen = []
    real = engine_memory.fresh_process_memory

    def spy(path, inputs, **kw):  # the real child runs; the spy records what it was given
        seen.append((sorted(inputs), kw.get("env")))
        return real(path, inputs, **kw)

    monkeypatch.setattr(engine_memory, "fresh_process_memory", spy)
    assert mod.main([str(tiny_engine), "--device", "cpu", "--iters", "1", "--variants", "default", "both",
                     "--out", str(tmp_path), "--name", "m"]) == 0
    assert [env for _, env in seen] == [{}, mod.VARIANTS["both"]]
    assert seen[0][0] == ["can_bus", "image", "lidar2img", "prev_bev", "use_prev_bev"]
    doc = json.loads((tmp_path / "cpu" / "m.json").read_text())
    assert [r["variant"] for r in doc["rows"]] == ["default", "both"] and all(r["ms"] > 0 for r in doc["rows"])
    assert "expandable_segments:True" in (tmp_path / "cpu" / "m.md").read_text()
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "absent.engine"), "--device", "cpu"])


def test_the_child_gets_the_environment(tiny_engine, monkeypatch, ops_on_references):  # noqa: F811
    """``env`` reaches the child on top of this process's variables; without it the child inherits them."""
    import subprocess

    calls = []
    real_run = subprocess.run

    def run(cmd, **kw):
        calls.append(kw.get("env"))
        return real_run(cmd, **kw)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setenv("BEVDEPLOY_PARENT_ONLY", "1")
    from tests.engine.test_engine import _inputs

    engine_memory.fresh_process_memory(tiny_engine, _inputs(), iters=1, device="cpu", env={"BEVDEPLOY_X": "2"})
    engine_memory.fresh_process_memory(tiny_engine, _inputs(), iters=1, device="cpu")
    assert calls[0]["BEVDEPLOY_X"] == "2" and calls[0]["BEVDEPLOY_PARENT_ONLY"] == "1"
    assert calls[1] is None  # no env: the child inherits this process's
