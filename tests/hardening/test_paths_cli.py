"""Output paths checked before work, atomic replacement, and one-line CLI errors with exit codes."""

import os
import sys

import pytest
import torch

from bevdeploy import cli
from bevdeploy.paths import atomic_output, check_output_path


def test_output_path_checks(tmp_path):
    with pytest.raises(ValueError, match="engine file .* is a directory"):
        check_output_path(tmp_path, "engine file")
    with pytest.raises(ValueError, match="is a device or special file"):
        check_output_path("/dev/null")
    link = tmp_path / "link.engine"
    link.symlink_to("/dev/null")
    with pytest.raises(ValueError, match="is a symbolic link"):
        check_output_path(link)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        check_output_path(afile / "sub" / "x.engine")
    assert check_output_path(tmp_path / "new" / "dir" / "x.engine") == tmp_path / "new" / "dir" / "x.engine"
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="permission denied"):
        check_output_path(locked / "x.engine")


def test_atomic_output_keeps_old_content_and_never_leaves_tmp(tmp_path, monkeypatch):
    out = tmp_path / "x.engine"
    out.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert out.read_text() == "old" and not (tmp_path / "x.engine.tmp").exists()

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        with atomic_output(out) as tmp:
            tmp.write_text("new")
    assert out.read_text() == "old" and not (tmp_path / "x.engine.tmp").exists()
    monkeypatch.undo()
    with atomic_output(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.engine"]


def _run(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def _fail_if_called(*args, **kwargs):
    raise AssertionError("the work started before the bad path was refused")


def test_build_into_a_directory_or_device_fails_before_work(tmp_path, capsys, monkeypatch):
    import bevdeploy.engine  # noqa: F401

    monkeypatch.setattr(sys.modules["bevdeploy.engine.build"], "_load_float_model", _fail_if_called)
    for target, match in ((tmp_path, "is a directory"), ("/dev/null", "device or special file")):
        rc, err = _run(["build", "--model", "bevformer-tiny", "--precision", "fp32", "-o", str(target)], capsys)
        assert rc == 2 and match in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_build_with_bad_checkpoint_is_one_line(tmp_path, capsys):
    text = tmp_path / "w.pth"
    text.write_text("hello")
    out = tmp_path / "x.engine"
    rc, err = _run(["build", "--model", "bevformer-tiny", "--precision", "fp32", "--checkpoint", str(text),
                    "-o", str(out)], capsys)
    assert rc == 2 and "not a PyTorch checkpoint" in err and err.count("\n") == 1
    rc, err = _run(["build", "--model", "bevformer-tiny", "--precision", "fp32", "--checkpoint", str(tmp_path),
                    "-o", str(out)], capsys)
    assert rc == 2 and "is a directory" in err
    assert not out.exists() and not (tmp_path / "x.engine.tmp").exists()


def test_eval_save_run_checked_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("bevdeploy.eval.detection.evaluate", _fail_if_called)
    rc, err = _run(["eval", "--model", "bevformer-tiny", "--data", "synthetic:1", "--save-run", str(tmp_path)], capsys)
    assert rc == 2 and "--save-run file" in err and "is a directory" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(tmp_path, capsys):
    rc, err = _run(["build", "--model", "bevformer-tiny", "--precision", "fp32", "--device", "cuda",
                    "-o", str(tmp_path / "x.engine")], capsys)
    assert rc == 2 and "no CUDA GPU is available" in err and err.count("\n") == 1


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("unexpected\nmulti-line")

    monkeypatch.setattr("bevdeploy.engine.build", broken)
    argv = ["build", "--model", "bevformer-tiny", "--precision", "fp32", "-o", str(tmp_path / "x.engine")]
    rc, err = _run(argv, capsys)
    assert rc == 1 and "internal error: TypeError: unexpected multi-line" in err and err.count("\n") == 1
    with pytest.raises(TypeError):
        cli.main(["--debug", *argv])
