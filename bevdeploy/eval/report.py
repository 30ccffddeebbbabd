"""``bevdeploy report``: one self-contained HTML page from a folder of bench JSON files.

Per model table (``bevdeploy bench --model``): bar charts of latency, speedup over PyTorch and
fidelity NDS per precision (inline SVG drawn by matplotlib), then every row of the file with its
memory, size, NDS/mAP, fidelity and output SQNR. The op table (``bevdeploy bench ops``) follows.
Each section names the GPU, the software versions and the exact commands that made it. No external
assets: the page opens offline and can be mailed as one file.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

__all__ = ["load_bench_files", "render_report", "write_report"]

#: Columns of the model tables, in order (label, row key, format).
MODEL_COLUMNS = (
    ("precision", "precision", "{}"),
    ("batch", "batch", "{}"),
    ("latency ms", "latency_ms", "{:.3f}"),
    ("FPS", "fps", "{:.2f}"),
    ("x PyTorch", "fps_ratio", "{:.2f}"),
    ("size MB", "engine_mb", "{:.1f}"),
    ("x size", "size_ratio", "{:.3f}"),
    ("GPU memory MB", "memory_mb", "{:.1f}"),
    ("x memory", "memory_ratio", "{:.3f}"),
    ("NDS", "nds", "{:.4f}"),
    ("mAP", "map", "{:.4f}"),
    ("fidelity NDS", "fidelity_nds", "{:.4f}"),
    ("output SQNR dB", "output_sqnr_db", "{:.1f}"),
    ("int8 layers", "int8_layers", "{}"),
    ("run", "run", "{}"),
)
OP_COLUMNS = (
    ("op", "op", "{}"),
    ("variant", "variant", "{}"),
    ("shape", "shape", "{}"),
    ("ms", "ms", "{:.4f}"),
    ("reference ms", "reference_ms", "{:.4f}"),
    ("x reference", "speedup", "{:.2f}"),
    ("x fp32 kernel", "speedup_vs_fp32_kernel", "{:.2f}"),
    ("of copy bandwidth", "bandwidth_fraction", "{:.3f}"),
)


def load_bench_files(results_dir: str | Path) -> list[tuple[Path, dict]]:
    """Every ``*.json`` bench file (a dict with ``rows``) in ``results_dir``, models first, ops last."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {str(root)!r} does not exist")
    found = []
    for path in sorted(root.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable bench JSON file ({e})") from e
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            found.append((path, data))
    if not found:
        raise ValueError(f"no bench JSON files (with 'rows') in {str(root)!r}; run 'bevdeploy bench' first")
    return sorted(found, key=lambda item: (_is_ops(item[1]), item[0].name))


def _is_ops(data: dict) -> bool:
    return bool(data["rows"]) and "op" in data["rows"][0]


def _cell(value, fmt: str) -> str:
    if value is None:
        return ""
    try:
        return html.escape(fmt.format(value))
    except (ValueError, TypeError):
        return html.escape(str(value))


def _table(rows: list[dict], columns, file_id: str) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _, _ in columns)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td>{_cell(row.get(key), fmt)}</td>" for _, key, fmt in columns)
        body.append(f'<tr data-row="{html.escape(file_id)}:{i}">{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _runs(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped by run (an appended table holds several, each with its own PyTorch row)."""
    runs: dict[str, list[dict]] = {}
    for row in rows:
        runs.setdefault(str(row.get("run", "")), []).append(row)
    return list(runs.values())


def _svg(fig) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text: a tenth of the size of glyph paths
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _model_charts(name: str, rows: list[dict]) -> str:
    """Latency, speedup and fidelity NDS per precision: one bar per row, bars of a run side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2), dpi=100)
    axes = fig.subplots(1, 3)
    labels = [f"{r.get('precision')}" + (f"\n#{k}" if len(_runs(rows)) > 1 else "")
              for k, run in enumerate(_runs(rows), 1) for r in run]
    ordered = [r for run in _runs(rows) for r in run]
    panels = (("latency per frame (ms)", "latency_ms"), ("speedup vs PyTorch (x)", "fps_ratio"),
              ("fidelity NDS vs PyTorch", "fidelity_nds"))
    for ax, (title, key) in zip(axes, panels):
        values = [r.get(key) or 0.0 for r in ordered]
        colors = ["0.55" if r.get("precision") == "pytorch" else "tab:blue" for r in ordered]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), labels, rotation=60, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        for x, v in enumerate(values):
            if v:
                ax.text(x, v, f"{v:.3g}", ha="center", va="bottom", fontsize=6)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    return _svg(fig)


def _facts(data: dict) -> str:
    keys = ("gpu", "torch", "triton", "date", "copy_bandwidth_TBps")
    facts = ", ".join(f"{k} {html.escape(str(data[k]))}" for k in keys if data.get(k) is not None)
    commands = sorted({str(r["command"]) for r in data["rows"] if r.get("command")} | (
        {str(data["command"])} if data.get("command") else set()))
    cmd = "".join(f"<pre>{html.escape(c)}</pre>" for c in commands)
    return f"<p class=facts>{facts}</p>{cmd}"


def render_report(files: list[tuple[Path, dict]], title: str = "bevdeploy benchmarks") -> str:
    """The HTML page (a string) for :func:`load_bench_files`'s files."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    gpus = sorted({str(d.get("gpu")) for _, d in files if d.get("gpu")})
    if gpus:
        parts.append(f"<p>Measured on {html.escape(', '.join(gpus))}. Latency is the median per frame inside a "
                     "CUDA graph; ratios are against the PyTorch eager FP32 row of the same run. Random weights "
                     "unless a checkpoint is named: NDS near 0, fidelity NDS and output SQNR measure what "
                     "deployment changed.</p>")
    for path, data in files:
        parts.append(f"<h2 id='{html.escape(path.stem)}'>{html.escape(path.stem)}</h2>")
        parts.append(_facts(data))
        if _is_ops(data):
            parts.append(_table(data["rows"], OP_COLUMNS, path.name))
            for note in data.get("notes") or []:
                parts.append(f"<p class=note>{html.escape(str(note))}</p>")
        else:
            parts.append(_model_charts(path.stem, data["rows"]))
            parts.append(_table(data["rows"], MODEL_COLUMNS, path.name))
    style = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto;font-size:14px}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;"
             "text-align:right;font-size:12px}th{background:#eee}pre{background:#f6f6f6;padding:4px;"
             "white-space:pre-wrap}.facts{color:#555}svg{max-width:100%;height:auto}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(results_dir: str | Path, out: str | Path) -> Path:
    """Write the report of ``results_dir``'s bench JSONs to ``out``; returns its path."""
    files = load_bench_files(results_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = next((d["gpu"] for _, d in files if d.get("gpu")), None)
    out.write_text(render_report(files, f"bevdeploy benchmarks{f' on {gpu}' if gpu else ''}"))
    return out
