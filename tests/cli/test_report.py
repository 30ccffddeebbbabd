"""``bevdeploy report``: one self-contained page holding every row of the bench JSONs it read."""

import json
import shutil
from pathlib import Path

import pytest

from bevdeploy import cli
from bevdeploy.eval.report import MODEL_COLUMNS, OP_COLUMNS, _cell

COMMITTED = Path(__file__).resolve().parents[2] / "bench" / "results" / "nvidia-h100-80gb-hbm3"


def _bench_dir(tmp_path):
    """The committed H100 JSONs when present, else two small made-up files of the same form."""
    if COMMITTED.is_dir() and list(COMMITTED.glob("*.json")):
        shutil.copytree(COMMITTED, tmp_path / "r", ignore=shutil.ignore_patterns("*.html", "*.md", "*.txt"))
        return tmp_path / "r"
    d = tmp_path / "r"
    d.mkdir()
    model_rows = [{"model": "m", "precision": p, "fps": f, "latency_ms": 1000 / f, "fps_ratio": f / 40, "run": "a",
                   "engine_mb": 9.5, "nds": 0.01, "fidelity_nds": None if p == "pytorch" else 0.97}
                  for p, f in (("pytorch", 40.0), ("fp16", 310.5))]
    (d / "m.json").write_text(json.dumps({"gpu": "G", "command": "bevdeploy bench --model m", "rows": model_rows}))
    (d / "ops.json").write_text(json.dumps({"gpu": "G", "rows": [{"op": "msda", "variant": "fp16", "ms": 0.5}]}))
    return d


def test_report_holds_every_row(tmp_path, capsys):
    d = _bench_dir(tmp_path)
    out = tmp_path / "report.html"
    assert cli.main(["report", str(d), "-o", str(out)]) == 0
    page = out.read_text()
    assert str(out) in capsys.readouterr().out
    assert "<svg" in page and "src=\"http" not in page and "<link" not in page and "<script" not in page
    for path in sorted(d.glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data.get("rows"), list):  # not a bench table (e.g. an int8 diagnosis): the report skips it
            assert f'data-row="{path.name}:' not in page
            continue
        columns = OP_COLUMNS if "op" in data["rows"][0] else MODEL_COLUMNS
        for i, row in enumerate(data["rows"]):
            start = page.index(f'data-row="{path.name}:{i}"')
            tr = page[start:page.index("</tr>", start)]
            for _, key, fmt in columns:  # each cell of the row, formatted as the table shows it
                assert f"<td>{_cell(row.get(key), fmt)}</td>" in tr, (path.name, i, key)
        assert page.count(f'data-row="{path.name}:') == len(data["rows"])
        if data.get("command"):
            assert data["command"].split()[1] in page


def test_report_refuses_a_folder_without_bench_files(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path), "-o", str(tmp_path / "x.html")]) == 2
    assert "no bench JSON files" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from bevdeploy.eval.report import load_bench_files

        load_bench_files(tmp_path / "missing")
