"""The README's "Use it from Python" examples run as written, at reduced model and image sizes."""

import re
from pathlib import Path

import pytest

from bevdeploy.data.synthetic import SYNTHETIC_VERSION, generate

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = dict(image_size=(64, 96), bev_h=8, bev_w=8, num_query=20, num_encoder_layers=1, num_decoder_layers=1)


def _examples() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Use it from Python"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _shrink(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in code, f"README example changed: {old!r} not found; update this test"
        code = code.replace(old, new)
    return code


def test_readme_has_two_python_examples():
    assert len(_examples()) == 2


def test_engine_on_your_own_images(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _shrink(_examples()[0], {
        'build("bevformer-tiny", "fp32", out=': 'build("bevformer-tiny", "fp32", model_overrides=TINY, device="cpu", out=',
        "H, W = 900, 1600": "H, W = 128, 192",  # the reduced model takes 64x96 after tiny's 0.5 scale
        "Engine.load(build(": "Engine.load(device='cpu', path=build(",
    })
    exec(compile(code, "README example 1", "exec"), {"TINY": TINY})
    lines = capsys.readouterr().out.strip().splitlines()[-3:]
    assert [line.split()[0] for line in lines] == ["0", "1", "2"]
    assert all("torch.Size([" in line for line in lines)


def test_quantize_your_own_module_and_build_your_own_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = generate(tmp_path / "w", num_scenes=1, samples_per_scene=1, seed=2, image_size=(128, 192), progress=False)
    code = _shrink(_examples()[1], {
        "bevformer_tiny()": "bevformer_tiny(**TINY)",
        'calib="synthetic:8"': f'device="cpu", calib="nuscenes:{root}@{SYNTHETIC_VERSION}:1"',
    })
    scope = {"TINY": TINY}
    exec(compile(code, "README example 2", "exec"), scope)
    assert [p for _, p in [(r.name, r.precision) for r in scope["layers"]]].count("int8") == 2
    assert scope["y"].shape == (2, 8, 32, 32)
    assert Path(scope["path"]).is_file()
    # the user's module is left float (build works on a copy)
    import torch

    assert not any(type(m).__module__.startswith("bevdeploy.quant") for m in scope["model"].modules())
    assert all(p.dtype == torch.float32 for p in scope["model"].parameters())
