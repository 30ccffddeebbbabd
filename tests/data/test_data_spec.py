"""``nuscenes:PATH[@version][:split][:N]``: parsing, defaults, and calibration on the train split."""

from pathlib import Path

import pytest

from bevdeploy.data.nuscenes import NuScenesSpec, default_split, parse_nuscenes_spec
from bevdeploy.data.synthetic import SYNTHETIC_VERSION, generate, parse_data_spec, resolve_data_spec


@pytest.mark.parametrize("arg, expected", [
    ("/d", NuScenesSpec(Path("/d"))),
    ("/d@v1.0-mini", NuScenesSpec(Path("/d"), "v1.0-mini")),
    ("/d:val:100", NuScenesSpec(Path("/d"), None, "val", 100)),
    ("/d@v1.0-test:test", NuScenesSpec(Path("/d"), "v1.0-test", "test")),
    ("/d:50", NuScenesSpec(Path("/d"), None, None, 50)),
    ("/a@b/d@v1.0-trainval:train:7", NuScenesSpec(Path("/a@b/d"), "v1.0-trainval", "train", 7)),
])
def test_parse(arg, expected):
    assert parse_nuscenes_spec(arg) == expected
    assert parse_data_spec(f"nuscenes:{arg}") == ("nuscenes", expected)


@pytest.mark.parametrize("bad", ["nuscenes:", "nuscenes:/d@", "nuscenes:/d:a:b:3", "nuscenes:/d:0", "nuscenes:@v1.0-mini"])
def test_bad_specs_name_the_form(bad):
    with pytest.raises(ValueError, match=r"nuscenes:PATH\[@version\]"):
        parse_data_spec(bad)


def test_resolve_version_split_count_and_calibration_default(tmp_path):
    root = generate(tmp_path / "w", num_scenes=1, samples_per_scene=2, seed=1, image_size=(32, 48), progress=False)
    src = resolve_data_spec(f"nuscenes:{root}@{SYNTHETIC_VERSION}:1")
    assert (src.version, src.split, src.num_samples) == (SYNTHETIC_VERSION, "val", 1)
    # the synthetic world has val scenes only: calibration falls back to the scored split
    assert resolve_data_spec(f"nuscenes:{root}@{SYNTHETIC_VERSION}", calibration=True).split == "val"
    assert resolve_data_spec(f"nuscenes:{root}@{SYNTHETIC_VERSION}:mini_val").split == "mini_val"
    with pytest.raises(FileNotFoundError, match="choose a version"):
        resolve_data_spec(f"nuscenes:{root}")
    with pytest.raises(FileNotFoundError, match="v1.0-mini"):
        resolve_data_spec(f"nuscenes:{root}@v1.0-mini")


def test_default_split_prefers_train_for_calibration(tmp_path):
    (tmp_path / "v1.0-trainval").mkdir()
    (tmp_path / "v1.0-trainval" / "scene.json").write_text('[{"name": "scene-0001"}, {"name": "scene-0003"}]')
    assert default_split(tmp_path, "v1.0-trainval") == "val"
    assert default_split(tmp_path, "v1.0-trainval", calibration=True) == "train"  # scene-0001 is a train scene
    (tmp_path / "v1.0-trainval" / "scene.json").write_text('[{"name": "scene-0003"}]')  # val only
    assert default_split(tmp_path, "v1.0-trainval", calibration=True) == "val"
    assert default_split(tmp_path, "v1.0-test", calibration=True) == "test"
