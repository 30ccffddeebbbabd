"""Reduced engines built once per session on the ops' references (seconds on the CPU), and helpers
to rewrite an engine archive member by member (the attacks and corruptions under test)."""

import io
import json
import zipfile

import pytest

from bevdeploy.engine import build
from tests._utils import ops_on_references_here

TINY = dict(image_size=(64, 96), bev_h=8, bev_w=8, num_query=20, num_encoder_layers=1, num_decoder_layers=1)


@pytest.fixture(scope="session")
def tiny_engine_path(tmp_path_factory):
    with ops_on_references_here():
        return build("bevformer-tiny", "fp32", out=tmp_path_factory.mktemp("tiny") / "tiny.engine",
                     model_overrides=TINY, progress=False)


def members(path) -> dict[str, bytes]:
    """Full member name -> bytes."""
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def member_name(files: dict, suffix: str) -> str:
    return next(n for n in files if n.endswith(suffix))


def rewrite(src, dst, replace: dict | None = None, add: dict | None = None, drop=()) -> None:
    """Copy the engine archive ``src`` to ``dst`` with members replaced (by suffix), added or dropped."""
    files = members(src)
    for suffix, data in (replace or {}).items():
        files[member_name(files, suffix)] = data
    root = next(iter(files)).split("/", 1)[0]
    for name, data in (add or {}).items():
        files[f"{root}/{name}"] = data
    for suffix in drop:
        files.pop(member_name(files, suffix))
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)


def edit_json(path, suffix: str, edit) -> bytes:
    doc = json.loads(members(path)[member_name(members(path), suffix)])
    edit(doc)
    return json.dumps(doc).encode()


__all__ = ["TINY", "members", "member_name", "rewrite", "edit_json", "io"]
