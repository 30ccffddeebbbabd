"""``--int8-chain`` on ``bevdeploy build`` and ``bevdeploy bench``: each choice reaches ``build(int8_chain=...)``."""

from pathlib import Path

import pytest

import bevdeploy.engine
import bevdeploy.eval.bench_models
from bevdeploy.cli import main


def _fake_build(seen: dict, key: str, engine: Path):
    """A ``build`` that records ``kwargs[key]`` in ``seen`` and writes an empty engine file."""
    def fake_build(*args, **kwargs):
        seen[key] = kwargs[key]
        engine.write_bytes(b"")
        return engine
    return fake_build


def _fake_bench_model(seen: dict, key: str, tmp_path: Path):
    """A ``bench_model`` that records ``kwargs[key]`` as ``seen["bench"]`` and writes an empty table."""
    def fake_bench_model(name, precisions, **kwargs):
        seen["bench"] = kwargs[key]
        table = Path(tmp_path / "t.json")
        table.with_suffix(".md").write_text("table\n")
        return table
    return fake_bench_model


@pytest.mark.parametrize("flag, expected", [(None, True), ("on", True), ("off", False),
                                            ("float-identity", "float-identity")])
def test_build_and_bench_pass_the_int8_chain_choice(flag, expected, tmp_path, monkeypatch):
    seen = {}
    engine = tmp_path / "x.engine"
    monkeypatch.setattr(bevdeploy.engine, "build", _fake_build(seen, "int8_chain", engine))
    monkeypatch.setattr(bevdeploy.eval.bench_models, "bench_model", _fake_bench_model(seen, "int8_chain", tmp_path))
    extra = [] if flag is None else ["--int8-chain", flag]
    assert main(["build", "--model", "bevdet-r50-cbgs", "--precision", "int8", "--calib", "synthetic:2",
                 "-o", str(engine), *extra]) == 0
    assert main(["bench", "--model", "bevdet-r50-cbgs", "--precisions", "int8", *extra]) == 0
    assert seen == {"int8_chain": expected, "bench": expected}


def test_bad_int8_chain_choice_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--model", "bevdet-r50-cbgs", "--precision", "int8", "-o", "x", "--int8-chain", "yes"])
    assert "--int8-chain" in capsys.readouterr().err


def test_build_passes_asymmetric_and_refuses_it_for_float(tmp_path, monkeypatch, capsys):
    """``--asymmetric`` reaches ``build(asymmetric=True)``; on a float precision it is an error naming it."""
    seen = {}
    engine = tmp_path / "x.engine"
    monkeypatch.setattr(bevdeploy.engine, "build", _fake_build(seen, "asymmetric", engine))
    assert main(["build", "--model", "bevdet-r50-cbgs", "--precision", "int8", "--calib", "synthetic:2",
                 "-o", str(engine), "--asymmetric"]) == 0
    assert seen == {"asymmetric": True}
    assert main(["build", "--model", "bevdet-r50-cbgs", "--precision", "fp16", "-o", str(engine), "--asymmetric"]) != 0
    assert "--asymmetric" in capsys.readouterr().err


def test_build_and_bench_pass_int8_dcn(tmp_path, monkeypatch, capsys):
    """``--int8-dcn`` reaches ``build(int8_dcn=True)`` and ``bench_model(int8_dcn=True)``; a float build refuses it."""
    seen = {}
    engine = tmp_path / "x.engine"
    monkeypatch.setattr(bevdeploy.engine, "build", _fake_build(seen, "int8_dcn", engine))
    monkeypatch.setattr(bevdeploy.eval.bench_models, "bench_model", _fake_bench_model(seen, "int8_dcn", tmp_path))
    assert main(["build", "--model", "bevformer-base", "--precision", "int8-fp16", "--calib", "synthetic:2",
                 "-o", str(engine), "--int8-dcn"]) == 0
    assert main(["bench", "--model", "bevformer-base", "--precisions", "int8-fp16", "--int8-dcn"]) == 0
    assert seen == {"int8_dcn": True, "bench": True}
    assert main(["build", "--model", "bevformer-base", "--precision", "fp16", "-o", str(engine), "--int8-dcn"]) != 0
    assert "--int8-dcn" in capsys.readouterr().err


@pytest.mark.parametrize("extra, expected", [([], True), (["--inprocess-memory"], False)])
def test_bench_reads_engine_memory_in_a_fresh_process_unless_told(extra, expected, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(bevdeploy.eval.bench_models, "bench_model", _fake_bench_model(seen, "fresh_memory", tmp_path))
    assert main(["bench", "--model", "bevformer-tiny", "--precisions", "fp16", *extra]) == 0
    assert seen == {"bench": expected}
