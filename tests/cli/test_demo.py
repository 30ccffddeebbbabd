"""``bevdeploy demo``: a model it does not run is refused by name before any world is rendered."""

import pytest

from bevdeploy import cli


@pytest.mark.parametrize("model, message", [
    ("yolox-x", "the demo runs the BEV models; for yolox-x: bevdeploy eval --model yolox-x"),
    ("bevformer-huge", "unknown model 'bevformer-huge'"),
])
def test_demo_refuses_a_model_before_rendering(model, message, tmp_path, monkeypatch, capsys):
    import bevdeploy.data.synthetic as synthetic

    def no_world(*args, **kwargs):
        raise AssertionError("the world was rendered before the model was checked")

    monkeypatch.setattr(synthetic, "resolve_data_spec", no_world)
    assert cli.main(["demo", "--model", model, "--work-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
