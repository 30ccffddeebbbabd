"""``scripts/profile_engine.py``'s helpers that run without a GPU: which compiled code files belong to an engine
(those Inductor loaded after a mark) and their copies."""

import importlib.util
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("profile_engine", ROOT / "scripts" / "profile_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_code_loaded_after_the_mark_is_saved(tmp_path, monkeypatch):
    from torch._inductor.codecache import PyCodeCache

    pe = _script()
    files = []
    for i in range(3):
        f = tmp_path / f"c{i}.py"
        f.write_text(f"def call(args):  # wrapper {i}\n    pass\n")
        files.append(f)
    loaded = [types.SimpleNamespace(__file__=str(f)) for f in files] + [types.SimpleNamespace()]  # one without a file
    monkeypatch.setattr(PyCodeCache, "modules", loaded)
    assert pe.compiled_code_since(1) == files[1:]  # loaded before the mark: another engine's
    copies = pe.save_code(pe.compiled_code_since(1), tmp_path / "out" / "tiny-fp16x2")
    assert [c.name for c in copies] == ["c1.py", "c2.py"] and copies[1].read_text() == files[2].read_text()
