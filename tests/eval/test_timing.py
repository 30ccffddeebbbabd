"""Helpers of the GPU timing scripts (``bevdeploy.eval.timing``) that run without a GPU."""


def test_gpu_results_go_to_the_gpu_folder_and_out(tmp_path, monkeypatch):
    """``write_gpu_result``: a GPU script's file lands in bench/results/<gpu>/ (committed) and in $OUT (what a
    device call brings back)."""
    import torch

    from bevdeploy.eval.timing import write_gpu_result

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.chdir(tmp_path)
    path = write_gpu_result("x.md", "# x\n", str(tmp_path / "out"))
    assert path == tmp_path.joinpath("bench", "results", "nvidia-h100-80gb-hbm3", "x.md").relative_to(tmp_path)
    assert path.read_text() == (tmp_path / "out" / "x.md").read_text() == "# x\n"
