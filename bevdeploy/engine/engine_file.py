"""What an engine file may hold, checked before torch reads it: no pickles, one integrity hash, a metadata schema.

An engine file is shared and downloaded like data, but ``torch.export.load`` unpickles parts of
the archive (pickled weights or constants, custom objects, sample inputs, legacy members) and can
parse shape expressions with ``sympy.sympify`` (an ``eval``). So the archive (a zip) is read into
memory and inspected first: only the members ``torch.export.save`` writes for a static, tensor-only
program are allowed (raw weight / constant bytes, JSON configs with ``use_pickle: false``, an
empty sample-inputs member), every graph node must call an ``aten`` or ``bevdeploy`` op, and the
graph may hold no symbolic values, custom objects or guard code. torch then deserializes those
same bytes, which by then contain nothing it would unpickle.

Integrity: ``integrity_hash`` is a sha256 over every archive member that defines the program
(graph, weight and constant configs and bytes, names included; not the random serialization id)
and the metadata JSON without the hash itself; ``content_hash`` is the same digest without the
metadata, identical for identical programs. Both are recorded at build and re-checked on load.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

__all__ = [
    "ENGINE_FORMAT",
    "ENGINE_VERSION",
    "METADATA_KEY",
    "EngineArchive",
    "read_archive",
    "peek_model_name",
    "program_hash",
    "integrity_hash",
    "validate_metadata",
]

ENGINE_FORMAT = "bevdeploy.engine"
#: 2: integrity hash over graph, constants and metadata; archives without pickled members.
ENGINE_VERSION = 2
#: Name of the metadata entry in the engine file's ``extra_files``.
METADATA_KEY = "bevdeploy.json"

_METADATA_MEMBER = f"extra/{METADATA_KEY}"
#: Members outside the hash: the metadata (hashed as parsed JSON) and torch's random save id.
_UNHASHED = {_METADATA_MEMBER, ".data/serialization_id"}
_ALLOWED = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/model\.pt|extra/bevdeploy\.json)"
)
_PICKLED = re.compile(r"(.*\.(pkl|pt|pth|pickle)|.*/custom_obj_\d+|.*/opaque_obj_\d+|.*data\.pkl)")
#: Graph node targets torch resolves to our ops or ATen (anything else could name any callable).
_TARGET = re.compile(r"torch\.ops\.(aten|bevdeploy)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|_operator\.getitem")
_INPUT_SPEC_KINDS = {"parameter", "buffer", "tensor_constant", "user_input"}
_OUTPUT_SPEC_KINDS = {"user_output"}


class EngineArchive:
    """An inspected engine file: ``data`` (the bytes torch may now read), ``metadata`` (parsed JSON),
    ``content_hash`` and ``integrity_hash`` (recomputed from the members), ``num_inputs`` and
    ``num_outputs`` (user inputs / outputs of the graph)."""

    def __init__(self, data: bytes, metadata: dict, content_hash: str, integrity: str, num_inputs: int,
                 num_outputs: int) -> None:
        self.data = data
        self.metadata = metadata
        self.content_hash = content_hash
        self.integrity_hash = integrity
        self.num_inputs = num_inputs
        self.num_outputs = num_outputs


def program_hash(members: dict[str, bytes]) -> str:
    """sha256 over the program's members (relative name, size, bytes), sorted by name."""
    h = hashlib.sha256()
    for name in sorted(members):
        if name in _UNHASHED:
            continue
        h.update(f"{name}\0{len(members[name])}\0".encode())
        h.update(members[name])
    return h.hexdigest()


def integrity_hash(content_hash: str, metadata: dict) -> str:
    """sha256 of the program hash and the canonical metadata JSON without ``integrity_hash``."""
    meta = {k: v for k, v in metadata.items() if k != "integrity_hash"}
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(f"{content_hash}\0{text}".encode()).hexdigest()


def _refuse(where: str, problem: str) -> ValueError:
    return ValueError(f"{where}: refusing to load this engine file: {problem}")


def _members(data: bytes, where: str) -> dict[str, bytes]:
    """The archive's members by name relative to its one top folder (CRCs verified on read)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            roots = {i.filename.split("/", 1)[0] for i in infos}
            if len(roots) != 1 or not infos:
                raise _refuse(where, f"not a single-folder engine archive (top-level entries {sorted(roots)[:5]})")
            root = roots.pop()
            members: dict[str, bytes] = {}
            for info in infos:
                name = info.filename[len(root) + 1:]
                if info.is_dir():
                    continue
                if name in members:
                    raise _refuse(where, f"member {name!r} appears twice")
                if _PICKLED.fullmatch(name) and not (name == "data/sample_inputs/model.pt" and info.file_size == 0):
                    raise _refuse(where, f"member {info.filename!r} is a pickle, which torch would unpickle "
                                         "(unpickling can run code from the file)")
                if not _ALLOWED.fullmatch(name):
                    raise _refuse(where, f"unexpected member {info.filename!r} (not part of a bevdeploy engine)")
                members[name] = zf.read(info)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{where}: not a readable bevdeploy engine file (corrupt or truncated?): {e}") from e
    return members


def _check_payload_config(members: dict[str, bytes], config_name: str, folder: str, prefix: str, where: str) -> None:
    try:
        config = json.loads(members[config_name])["config"]
        entries = list(config.items())
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: corrupt engine file: {config_name} is unreadable ({e})") from e
    for fqn, entry in entries:
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            raise _refuse(where, f"{config_name} marks {fqn!r} as pickled (use_pickle), which torch would unpickle "
                                 "(unpickling can run code from the file)")
        path_name = str(entry.get("path_name"))
        if not re.fullmatch(prefix + r"\d+", path_name) or f"{folder}/{path_name}" not in members:
            raise _refuse(where, f"{config_name}: {fqn!r} names payload {path_name!r}, which is not a raw tensor "
                                 "member of the archive")


def _check_graph(members: dict[str, bytes], where: str) -> tuple[int, int]:
    try:
        program = json.loads(members["models/model.json"])
        gm = program["graph_module"]
        graph, signature = gm["graph"], gm["signature"]
        nodes = graph["nodes"]
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: corrupt engine file: models/model.json is unreadable ({e})") from e
    bad = sorted({str(n.get("target")) for n in nodes if not _TARGET.fullmatch(str(n.get("target")))})
    if bad:
        raise _refuse(where, f"the graph calls {bad[:5]}, not ATen or bevdeploy ops")
    for key in ("sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values"):
        if graph.get(key):
            raise _refuse(where, f"the graph holds {key} (an engine is static and tensor-only)")
    if program.get("range_constraints") or program.get("guards_code"):
        raise _refuse(where, "the program holds shape constraints or guard code (an engine has static shapes)")
    inputs = signature.get("input_specs", [])
    outputs = signature.get("output_specs", [])
    kinds = {k for spec in inputs for k in spec} | {k for spec in outputs for k in spec}
    if not kinds <= _INPUT_SPEC_KINDS | _OUTPUT_SPEC_KINDS:
        raise _refuse(where, f"the graph signature has {sorted(kinds - _INPUT_SPEC_KINDS - _OUTPUT_SPEC_KINDS)} "
                             "inputs/outputs (an engine takes and returns tensors only)")
    return sum("user_input" in s for s in inputs), sum("user_output" in s for s in outputs)


def read_archive(path: str | Path) -> EngineArchive:
    """Read and inspect an engine file without deserializing anything but JSON.

    Raises:
        FileNotFoundError: ``path`` is missing (or not a regular file).
        ValueError: the file is unreadable, corrupt, holds a member torch would unpickle, calls an
            op outside ATen / bevdeploy, or its metadata is missing (messages name ``path`` and the member).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"engine file {str(path)!r} is a directory")
    if not path.is_file():
        raise FileNotFoundError(f"engine file {str(path)!r} does not exist")
    where = str(path)
    data = path.read_bytes()
    members = _members(data, where)
    required = ["models/model.json", "data/weights/model_weights_config.json",
                "data/constants/model_constants_config.json", _METADATA_MEMBER]
    missing = [m for m in required if m not in members]
    if missing:
        raise ValueError(f"{where}: not a bevdeploy engine file (missing {missing}); corrupt or not an engine?")
    sample = members.get("data/sample_inputs/model.pt", b"")
    if sample:
        raise _refuse(where, "data/sample_inputs/model.pt holds pickled sample inputs (unpickling can run code)")
    _check_payload_config(members, "data/weights/model_weights_config.json", "data/weights", "weight_", where)
    _check_payload_config(members, "data/constants/model_constants_config.json", "data/constants", "tensor_", where)
    num_inputs, num_outputs = _check_graph(members, where)
    try:
        meta = json.loads(members[_METADATA_MEMBER].decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: engine metadata ({METADATA_KEY}) is corrupt: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != ENGINE_FORMAT:
        raise ValueError(f"{where}: not a bevdeploy engine file (no {ENGINE_FORMAT!r} metadata)")
    content = program_hash(members)
    try:
        integrity = integrity_hash(content, meta)
    except ValueError as e:  # NaN/inf in the metadata
        raise ValueError(f"{where}: engine metadata ({METADATA_KEY}) is corrupt: {e}") from e
    return EngineArchive(data, meta, content, integrity, num_inputs, num_outputs)


# ------------------------------------------------------------------------------------- metadata schema

_FAMILIES = ("bevformer", "bevdet", "yolox", "centernet")
_INPUT_DTYPES = ("float32", "float16", "int32")


def peek_model_name(path: str | Path) -> str | None:
    """The model an engine file says it was built from, read from its metadata member alone; None when
    that cannot be read. A hint for choosing which evaluation loop takes the file (3D or 2D), not a check:
    :func:`read_archive` inspects the whole file when it is loaded and reports what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.split("/", 1)[-1] == _METADATA_MEMBER), None)
            model = json.loads(zf.read(name)).get("model") if name else None
    except (OSError, ValueError, zipfile.BadZipFile, AttributeError):
        return None
    return model if isinstance(model, str) else None


def _field(meta: dict, key: str, types, where: str, *, allow_none: bool = False):
    if key not in meta:
        raise ValueError(f"{where}: engine metadata lacks the field {key!r}")
    value = meta[key]
    if value is None and allow_none:
        return value
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ValueError(f"{where}: engine metadata field {key!r} must be {_type_names(types)}, got {value!r}")
    if not isinstance(value, types):
        raise ValueError(f"{where}: engine metadata field {key!r} must be {_type_names(types)}"
                         f"{' or null' if allow_none else ''}, got {type(value).__name__} {value!r:.60}")
    return value


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _positive_ints(value, key: str, where: str, *, minimum: int = 1) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                                              for v in value):
        kind = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{where}: engine metadata field {key!r} must be a list of {kind} ints, got {value!r:.80}")
    return value


def validate_metadata(meta: dict, where: str) -> None:
    """Check every field the engine reads (ValueError naming the field, what it expected and got).

    Input and output names must be the family's, in the graph's order: a reordered list would
    label the outputs wrongly, so it is refused, as are duplicates and unknown dtypes / precisions.
    """
    from bevdeploy.engine.deploy import PRECISIONS
    from bevdeploy.engine.model_io import family_input_names, family_output_names

    _field(meta, "version", int, where)
    _field(meta, "model", str, where)
    fam = _field(meta, "family", str, where)
    if fam not in _FAMILIES:
        raise ValueError(f"{where}: engine metadata field 'family' must be one of {_FAMILIES}, got {fam!r}")
    _field(meta, "model_config", dict, where)
    precision = _field(meta, "precision", str, where)
    if precision not in PRECISIONS:
        raise ValueError(f"{where}: engine metadata field 'precision' must be one of {PRECISIONS}, got {precision!r}")
    batch = _field(meta, "batch", int, where)
    if batch < 1:
        raise ValueError(f"{where}: engine metadata field 'batch' must be >= 1, got {batch}")
    inputs = _field(meta, "inputs", dict, where)
    for name, spec in inputs.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: engine metadata field 'inputs.{name}' must be an object, got {spec!r:.60}")
        _positive_ints(spec.get("shape"), f"inputs.{name}.shape", where)
        if spec.get("dtype") not in _INPUT_DTYPES:
            raise ValueError(f"{where}: engine metadata field 'inputs.{name}.dtype' must be one of {_INPUT_DTYPES}, "
                             f"got {spec.get('dtype')!r}")
    expected_in = list(family_input_names(fam))
    if list(inputs) != expected_in:
        raise ValueError(f"{where}: engine metadata field 'inputs' must name {expected_in} in this order "
                         f"(a {fam} engine), got {list(inputs)}")
    outputs = _field(meta, "outputs", list, where)
    if len(set(map(str, outputs))) != len(outputs):
        dup = sorted({o for o in outputs if outputs.count(o) > 1})
        raise ValueError(f"{where}: engine metadata field 'outputs' has duplicate names {dup}")
    expected_out = list(family_output_names(fam))
    if outputs != expected_out:
        raise ValueError(f"{where}: engine metadata field 'outputs' must be {expected_out} in this order "
                         f"(a {fam} engine), got {outputs}")
    if fam == "bevformer":
        bev = _field(meta, "bev_shape", list, where)
        if len(_positive_ints(bev, "bev_shape", where)) != 2:
            raise ValueError(f"{where}: engine metadata field 'bev_shape' must be [HW, C], got {bev}")
    rows = _field(meta, "layer_precisions", list, where)
    if not all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in rows):
        raise ValueError(f"{where}: engine metadata field 'layer_precisions' must be [layer, precision] string pairs")
    _field(meta, "int8_layers", int, where)
    for key in ("content_hash", "integrity_hash"):
        value = _field(meta, key, str, where)
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError(f"{where}: engine metadata field {key!r} must be 64 hex digits, got {value!r:.80}")
    _field(meta, "torch", str, where)
    device_type = _field(meta, "device_type", str, where)
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: engine metadata field 'device_type' must be 'cpu' or 'cuda', got {device_type!r}")
    gpu = _field(meta, "gpu", dict, where, allow_none=True)
    if gpu is not None and (len(_positive_ints(gpu.get("capability"), "gpu.capability", where, minimum=0)) != 2
                            or not isinstance(gpu.get("name"), str)):
        raise ValueError(f"{where}: engine metadata field 'gpu' must be {{name, capability: [major, minor]}}")
    _field(meta, "calibration", dict, where, allow_none=True)
    _field(meta, "checkpoint", str, where, allow_none=True)
    _field(meta, "calibration_table_file", str, where, allow_none=True)
    _field(meta, "preprocess", str, where)
