"""Loading and running an engine file: checks, Inductor compile, CUDA-graph replay, temporal state.

``Engine.load`` never unpickles: the archive is inspected before torch reads it
(:mod:`bevdeploy.engine.engine_file`: members torch would unpickle, foreign ops, symbolic shapes are
refused). It refuses files it cannot trust with a clear error: unreadable / truncated / not an
engine, metadata failing its schema (the field named), or an integrity hash over graph, weights,
constants and metadata that differs from the one recorded at build (ValueError: corrupt); built
with another torch major.minor or on a GPU of another compute capability (RuntimeError: rebuild).
On CUDA the exported module is compiled with ``torch.compile`` (Inductor, on-disk cache under
``~/.cache/bevdeploy/inductor-ops<FAKE_LAYOUT_VERSION>`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set) and one call is captured
in a CUDA graph on static input buffers; each call copies the inputs in, replays and returns copies
of the outputs. On the CPU the exported module runs eagerly (no compile, no graphs).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from bevdeploy.engine.build import resolve_device
from bevdeploy.engine.engine_file import ENGINE_VERSION, read_archive, validate_metadata

__all__ = ["Engine", "example_inputs", "held_weight_bytes", "input_spec", "read_metadata"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32}


def _rebuild_advice(meta: dict) -> str:
    cmd = f"bevdeploy build --model {meta.get('model', 'MODEL')} --precision {meta.get('precision', 'P')}"
    if meta.get("checkpoint"):
        cmd += f" --checkpoint {meta['checkpoint']}"
    if meta.get("calibration_table_file"):
        cmd += f" --calib-table {meta['calibration_table_file']}"
    return f"rebuild it on this machine with `{cmd} -o ENGINE`"


def _major_minor(version: str | None) -> tuple[str, ...] | None:
    return tuple(version.split("+")[0].split(".")[:2]) if version else None


def read_metadata(path: str | Path) -> tuple[torch.export.ExportedProgram, dict]:
    """Inspect, check and load an engine file: (exported program, metadata).

    Order: the archive is inspected without unpickling anything (no pickled member, only ATen /
    bevdeploy ops), the format version and metadata schema are checked, then the integrity hash,
    and only then torch deserializes the inspected bytes. Machine checks (torch version, GPU) are
    :meth:`Engine.load`'s.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, corrupt, tampered with, unsafe or failing the schema (named).
        RuntimeError: another engine format version (rebuild advice).
    """
    archive = _inspect(Path(path))
    _check_integrity(Path(path), archive)
    return _deserialize(Path(path), archive), archive.metadata


def _inspect(path: Path):
    archive = read_archive(path)
    meta = archive.metadata
    if meta.get("version") != ENGINE_VERSION:
        raise RuntimeError(f"{path}: engine format version {meta.get('version')!r}, this bevdeploy reads "
                           f"{ENGINE_VERSION}: {_rebuild_advice(meta)}")
    validate_metadata(meta, str(path))
    if archive.num_inputs != len(meta["inputs"]) or archive.num_outputs != len(meta["outputs"]):
        raise ValueError(f"{path}: corrupt engine file: the graph takes {archive.num_inputs} inputs and returns "
                         f"{archive.num_outputs} outputs, the metadata names {len(meta['inputs'])} and "
                         f"{len(meta['outputs'])}")
    return archive


def _check_integrity(path: Path, archive) -> None:
    meta = archive.metadata
    if archive.content_hash != meta["content_hash"] or archive.integrity_hash != meta["integrity_hash"]:
        part = "graph / weights / constants" if archive.content_hash != meta["content_hash"] else "metadata"
        raise ValueError(f"{path}: corrupt engine file: its integrity hash {archive.integrity_hash[:12]}... differs "
                         f"from the one recorded at build {meta['integrity_hash'][:12]}... (the {part} changed "
                         "since the build); rebuild it")


def _deserialize(path: Path, archive) -> torch.export.ExportedProgram:
    import bevdeploy.engine.conv_epilogue  # noqa: F401  (the ops must be registered before the program deserializes)
    import bevdeploy.engine.image_layout  # noqa: F401
    import bevdeploy.ops  # noqa: F401
    import bevdeploy.quant.fp8_kernels  # noqa: F401
    import bevdeploy.quant.int8_kernels  # noqa: F401

    try:  # the very bytes inspected above (the file is not read again)
        return torch.export.load(io.BytesIO(archive.data))
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a damaged archive)
        raise ValueError(f"{path}: not a readable bevdeploy engine file (corrupt or truncated?): "
                         f"{type(e).__name__}: {str(e)[:300]}") from e


def _check_runtime(path: Path, meta: dict, device: torch.device) -> None:
    """torch major.minor equal; on CUDA, an engine built on CUDA needs the same compute capability."""
    problems = []
    if _major_minor(meta.get("torch")) != _major_minor(torch.__version__):
        problems.append(f"built with torch {meta.get('torch')}, running torch {torch.__version__}")
    if device.type == "cuda" and meta.get("gpu"):
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cap = list(torch.cuda.get_device_capability(idx))
        if list(meta["gpu"].get("capability", [])) != cap:
            problems.append(f"built for {meta['gpu'].get('name')} (compute capability "
                            f"{'.'.join(map(str, meta['gpu'].get('capability', [])))}), running on "
                            f"{torch.cuda.get_device_name(idx)} ({cap[0]}.{cap[1]})")
    if problems:
        raise RuntimeError(f"{path}: engine does not match this machine: {'; '.join(problems)}; "
                           f"{_rebuild_advice(meta)}")
    try:
        import triton

        if meta.get("triton") and _major_minor(meta["triton"]) != _major_minor(triton.__version__):
            logger.warning("%s: built with triton %s, running %s (kernels recompile; rebuild if results differ)",
                           path, meta["triton"], triton.__version__)
    except ImportError:
        pass


def input_spec(metadata: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """An engine's inputs from its metadata: name -> (static shape, dtype), in the graph's order."""
    return {k: (tuple(v["shape"]), _DTYPES[v["dtype"]]) for k, v in metadata["inputs"].items()}


def example_inputs(spec: dict[str, tuple[tuple[int, ...], torch.dtype]], device="cpu") -> dict[str, Tensor]:
    """Valid inputs of an engine's static shapes (``spec`` as :func:`input_spec`): zeros, ``lidar2img`` the
    identity (BEVDet: all-zero indices are a valid empty pooling); what the CUDA-graph capture and the memory
    readings run, whose cost does not depend on the values."""
    ex = {k: torch.zeros(shape, dtype=dtype, device=device) for k, (shape, dtype) in spec.items()}
    if "lidar2img" in ex:
        ex["lidar2img"].copy_(torch.eye(4, device=device).expand_as(ex["lidar2img"]))
    return ex


def held_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers ``module`` still holds on a real device (0 after a frozen
    compile discarded them; shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


class Engine:
    """A loaded engine: call it with the model's inputs as keywords, or :meth:`step` it frame by frame.

    Build with :meth:`load`. Attributes: ``path``, ``metadata`` (dict), ``family`` (``bevformer`` /
    ``bevdet``), ``file_mb``, ``layer_precisions`` (list of (layer, precision)), ``bev_shape``
    ((HW, C); BEVFormer), ``preprocess_name``, ``input_spec``, ``output_names``.
    """

    def __init__(self, path: Path, ep: torch.export.ExportedProgram, metadata: dict, device: torch.device,
                 compile: bool, cuda_graphs: bool, freeze: bool = True) -> None:
        self.path = path
        self.metadata = metadata
        self.device = device
        self.file_mb = path.stat().st_size / 2**20
        self.layer_precisions = [tuple(r) for r in metadata.get("layer_precisions", [])]
        self.family = metadata.get("family", "bevformer")
        self.bev_shape = tuple(metadata["bev_shape"]) if metadata.get("bev_shape") else None
        self.preprocess_name = metadata.get("preprocess", metadata["model"])
        self.input_spec = input_spec(metadata)
        self.output_names = tuple(metadata["outputs"])
        self.batch = int(metadata.get("batch", 1))
        self._module = ep.module()
        self._fn: Callable = self._module
        self._graph = None
        self._static_in: dict[str, Tensor] = {}
        self._static_out: tuple[Tensor, ...] = ()
        self._streams: dict[int, dict] = {}
        self._coder = None
        self._geometry = None
        if compile:
            self._compile(freeze)
        if cuda_graphs:
            self._capture()

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, *, compile: bool | None = None,
             cuda_graphs: bool | None = None, freeze: bool = True) -> Engine:
        """Load, check and prepare an engine file.

        Args:
            path: The engine file (``bevdeploy build -o``).
            device: Where to run (default: cuda when available).
            compile: ``torch.compile`` the program (default: True on CUDA, False on CPU).
            cuda_graphs: Replay one CUDA graph per call (default: True on CUDA; needs CUDA).
            freeze: Inductor freezing when compiling: the weights become compile-time constants, so
                conv layouts are chosen once and constant work is folded (BEVDet-R50 fp16 on an H100:
                1.78 ms per frame frozen, 2.03 ms not).

        Raises:
            FileNotFoundError: No such file.
            ValueError: Unreadable, truncated, corrupt or tampered-with file, a member torch would
                unpickle, metadata failing its schema (the message names the file and the problem),
                or ``device`` cuda without a GPU.
            RuntimeError: Built for another torch major.minor or GPU compute capability (rebuild advice).
        """
        path = Path(path)
        dev = resolve_device(device)
        archive = _inspect(path)
        meta = archive.metadata
        _check_runtime(path, meta, dev)
        _check_integrity(path, archive)
        ep = _deserialize(path, archive)
        del archive
        if meta.get("device_type") != dev.type:
            from torch.export.passes import move_to_device_pass

            ep = move_to_device_pass(ep, dev)
        compile = dev.type == "cuda" if compile is None else compile
        cuda_graphs = dev.type == "cuda" if cuda_graphs is None else cuda_graphs
        if cuda_graphs and dev.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got {dev}")
        return cls(path, ep, meta, dev, compile, cuda_graphs, freeze)

    def _compile(self, freeze: bool) -> None:
        from bevdeploy.ops._utils import FAKE_LAYOUT_VERSION

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
            os.path.expanduser("~"), ".cache", "bevdeploy", f"inductor-ops{FAKE_LAYOUT_VERSION}"))
        import torch._inductor.config as inductor_config

        compiled = torch.compile(self._module, dynamic=False)
        # Freezing makes the weights Inductor constants (folded, in the layouts the kernels want);
        # freezing_discard_parameters then drops the module's own parameters and buffers (each
        # becomes a meta placeholder that raises if read), else every weight that freezing
        # transforms is kept twice. Nothing reads them afterwards: the engine runs only the compiled
        # function with fixed shapes, dtypes and grad mode (a recompile would raise rather than run
        # on stale weights), and a reload reads the file again.
        flags = {"freezing": bool(freeze), "freezing_discard_parameters": bool(freeze)}

        def run(*args):
            # Dynamo reads the freezing flag while tracing (weights as constants), Inductor while
            # compiling: both happen inside the first call, so the flag is set around every call.
            with inductor_config.patch(flags):
                return compiled(*args)

        self._fn = run

    def _capture(self) -> None:
        """Warm up (compile, autotune) on a side stream, then capture one call in a CUDA graph."""
        self._static_in = example_inputs(self.input_spec, self.device)
        args = tuple(self._static_in[k] for k in self.input_spec)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):
                self._fn(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self._graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self._graph):
            self._static_out = tuple(self._fn(*args))
        # compile-time blocks (autotuning, the warm-up outside the graph) are never used again: the
        # replays run in the graph's own pool, so give them back rather than keep them cached
        torch.cuda.empty_cache()

    def release_stack(self) -> dict[str, int | None] | None:
        """Give back the CUDA stack reservation the load grew (:mod:`bevdeploy.engine.cuda_stack`): the
        compile's autotuning launches kernel variants that may spill, and the driver keeps the largest
        per-thread stack any of them needed for the rest of the process. The limit goes back to the
        driver's default, then one replay of the graph lets its own kernels grow it to what they need.
        Returns the limit before and after in bytes (None off CUDA)."""
        from bevdeploy.engine.cuda_stack import DEFAULT_STACK_BYTES, set_stack_limit_bytes, stack_limit_bytes

        if self.device.type != "cuda":
            return None
        before = stack_limit_bytes()
        set_stack_limit_bytes(DEFAULT_STACK_BYTES)
        if self._graph is not None:
            with torch.no_grad():
                self._graph.replay()
            torch.cuda.synchronize(self.device)
        return {"before_bytes": before, "after_bytes": stack_limit_bytes()}

    @property
    def eager_weights_mb(self) -> float:
        """MB of weights the engine holds outside the compiled program: 0 once a frozen compile
        discarded the exported module's parameters; the whole model when it runs eagerly (CPU)."""
        return held_weight_bytes(self._module) / 2**20

    # ---------------------------------------------------------------- running
    def _inputs(self, **inputs: Tensor) -> list[Tensor]:
        missing = [k for k in self.input_spec if k not in inputs]
        extra = [k for k in inputs if k not in self.input_spec]
        if missing or extra:
            raise ValueError(f"engine inputs are {list(self.input_spec)}; missing {missing}, unexpected {extra}")
        out = []
        for k, (shape, dtype) in self.input_spec.items():
            t = inputs[k]
            if tuple(t.shape) != shape:
                raise ValueError(f"{k} must have shape {list(shape)} (the engine's static shape), got {list(t.shape)}")
            out.append(t.to(self.device, dtype))
        return out

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        """One frame of ``batch`` streams; inputs by name (``input_spec``), outputs as the model's dict
        (float32). BEVFormer: ``image, lidar2img, can_bus, prev_bev, use_prev_bev``; BEVDet: ``image``
        and the five index arrays of :meth:`prepare`."""
        args = self._inputs(**inputs)
        with torch.no_grad():
            if self._graph is not None:
                for buf, a in zip(self._static_in.values(), args):
                    buf.copy_(a)
                self._graph.replay()
                # the next replay overwrites the static outputs, so each result must be a new tensor: the float32
                # cast of an fp16 output is one (cloning it first copied the outputs twice: CenterNet's batch-32
                # heatmaps are 84 MB); a float32 output is cloned
                outs = tuple(o.clone() if o.dtype == torch.float32 else o.float() for o in self._static_out)
            else:
                outs = tuple(o.float() for o in self._fn(*args))
        if self.family == "bevdet":  # the pooling kernel's index guard, read outside the graph (one sync)
            from bevdeploy.ops.bev_pool_v2 import raise_if_bad_indices

            raise_if_bad_indices(self.device)
        return dict(zip(self.output_names, outs))

    forward = __call__

    def bindings(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The CUDA graph's own input and output tensors, for a serving loop without the copies of a call
        (TensorRT's bindings): write each input in place (``inputs["image"].copy_(frame)`` or decode into
        it), :meth:`replay`, read the outputs before the next replay overwrites them. The outputs are in the
        engine's dtype and layout (an fp16 engine's maps are fp16, possibly channel slices of one buffer),
        where a call returns float32 copies. Needs the CUDA graph (``Engine.load(..., cuda_graphs=True)``,
        the default on CUDA). No BEVDet index guard runs here: a call checks it."""
        if self._graph is None:
            raise ValueError(f"{self.path.name}: bindings are the CUDA graph's buffers and this engine runs without "
                             "one (a CPU engine, or loaded with cuda_graphs=False): call it instead")
        return dict(self._static_in), dict(zip(self.output_names, self._static_out))

    def replay(self) -> None:
        """Run the CUDA graph once on what :meth:`bindings`' inputs hold (asynchronous, on the current stream)."""
        if self._graph is None:
            raise ValueError(f"{self.path.name}: no CUDA graph to replay (a CPU engine, or loaded with "
                             "cuda_graphs=False): call the engine instead")
        self._graph.replay()

    def reset(self, stream: int | None = None) -> None:
        """Forget the previous BEV of ``stream`` (all streams when None)."""
        if stream is None:
            self._streams.clear()
        else:
            self._streams.pop(stream, None)

    def step(self, frame: dict, stream: int = 0) -> dict[str, Tensor]:
        """The temporal host loop for one stream and one frame (``prepare_frame``'s dict).

        Holds ``prev_bev`` per stream and feeds each ``bev_embed`` back; ``prev_bev`` is reset to
        zeros (and the gate closed) by :func:`bevdeploy.data.preprocess.carry_prev_bev`, the rule of
        the eval loop: ``frame["use_prev_bev"]`` 0, a changed or missing scene token, or a previous
        BEV holding NaN/inf (warned). Needs a BEVFormer engine built with ``batch=1``.
        """
        if self.family != "bevformer":
            raise ValueError(f"step() carries BEVFormer's previous BEV; this is a {self.family} engine: call it directly")
        if self.batch != 1:
            raise ValueError(f"step() runs one stream per call and this engine has batch {self.batch}: call "
                             f"step_batch() with {self.batch} frames (one per stream)")
        from bevdeploy.data.preprocess import carry_prev_bev

        state = self._streams.get(stream) or {"prev_bev": None, "scene": None}
        scene = frame.get("scene_token")
        prev_bev, gate = carry_prev_bev(state["prev_bev"], state["scene"], scene,
                                        float(torch.as_tensor(frame["use_prev_bev"]).reshape(-1)[0]),
                                        shape=(1, *self.bev_shape), device=self.device, token=frame.get("token", ""))
        outputs = self(image=frame["image"][None], lidar2img=frame["lidar2img"][None],
                       can_bus=frame["can_bus"][None], prev_bev=prev_bev,
                       use_prev_bev=torch.tensor([gate], device=self.device))
        self._streams[stream] = {"prev_bev": outputs["bev_embed"], "scene": scene}
        return outputs

    def step_batch(self, frames: Sequence[dict]) -> dict[str, Tensor]:
        """The temporal host loop for ``batch`` independent streams: frame ``i`` belongs to stream ``i``.

        Each stream keeps its own previous BEV and scene token and is reset on its own by the rule of
        :meth:`step` (its frame's ``use_prev_bev`` 0, a changed or missing ``scene_token``, or its
        previous BEV holding NaN/inf, warned with the frame's ``token``); one engine call runs all
        streams. A batch-1 engine takes a list of one frame (stream 0, the state of ``step()``).

        Args:
            frames: ``batch`` frames as :func:`bevdeploy.data.preprocess.prepare_frame` makes them
                (``image`` [6, 3, H, W], ``lidar2img``, ``can_bus``, ``use_prev_bev``, ``scene_token``,
                ``token``).

        Returns:
            The model's outputs for the batch: ``bev_embed`` [B, Q, C], ``all_cls_scores`` /
            ``all_bbox_preds`` [L, B, ...]; :meth:`decode` gives the boxes per stream and
            :meth:`split_streams` the outputs per stream.

        Raises:
            ValueError: Not a BEVFormer engine, or ``len(frames)`` differs from the engine's batch.
        """
        if self.family != "bevformer":
            raise ValueError(f"step_batch() carries BEVFormer's previous BEV; this is a {self.family} engine: "
                             "call it directly")
        if isinstance(frames, dict) or len(frames) != self.batch:
            got = "one frame dict" if isinstance(frames, dict) else f"{len(frames)} frames"
            raise ValueError(f"step_batch() takes one frame per stream: this engine has batch {self.batch}, got {got}")
        from bevdeploy.data.preprocess import carry_prev_bevs

        states = [self._streams.get(i) or {"prev_bev": None, "scene": None} for i in range(self.batch)]
        scenes = [f.get("scene_token") for f in frames]
        prev_bev, gates = carry_prev_bevs(
            [st["prev_bev"] for st in states], [st["scene"] for st in states], scenes,
            [float(torch.as_tensor(f["use_prev_bev"]).reshape(-1)[0]) for f in frames],
            shape=self.bev_shape, device=self.device, tokens=[f.get("token", "") for f in frames])
        outputs = self(image=torch.stack([f["image"] for f in frames]),
                       lidar2img=torch.stack([torch.as_tensor(f["lidar2img"]) for f in frames]),
                       can_bus=torch.stack([torch.as_tensor(f["can_bus"]) for f in frames]),
                       prev_bev=prev_bev, use_prev_bev=gates)
        bev = outputs["bev_embed"]
        for i, scene in enumerate(scenes):
            self._streams[i] = {"prev_bev": bev[i:i + 1], "scene": scene}
        return outputs

    def split_streams(self, outputs: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """BEVFormer outputs of a batch as one dict per stream, each shaped as a batch-1 engine's
        (views: ``bev_embed`` split on dim 0, the per-layer head outputs on dim 1)."""
        if self.family != "bevformer":
            raise ValueError(f"split_streams() splits BEVFormer's outputs; this is a {self.family} engine")
        dims = {k: 0 if k == "bev_embed" else 1 for k in outputs}
        return [{k: v.narrow(dims[k], i, 1) for k, v in outputs.items()} for i in range(self.batch)]

    def _model_config(self):
        from bevdeploy.models import BEVDetConfig, BEVFormerConfig

        def tuples(v):
            return tuple(tuples(x) for x in v) if isinstance(v, list) else v

        cls = BEVDetConfig if self.family == "bevdet" else BEVFormerConfig
        return cls(**{k: tuples(v) for k, v in self.metadata["model_config"].items()})

    def prepare(self, sensor2ego: Tensor, intrinsics: Tensor, post_rots: Tensor, post_trans: Tensor,
                bda: Tensor | None = None):
        """BEVDet: the index inputs for these cameras (``BEVDet.prepare``, cached per camera geometry),
        checked against the engine's sizes (ValueError for an index out of range)."""
        if self.family != "bevdet":
            raise ValueError(f"prepare() computes BEVDet's pooling indices; this is a {self.family} engine")
        from bevdeploy.ops.bev_pool_v2 import check_ranks

        if self._geometry is None:
            from bevdeploy.models.bevdet import BEVDetGeometry

            self._geometry = BEVDetGeometry.from_config(self._model_config())
        ranks = self._geometry.ranks(sensor2ego, intrinsics, post_rots, post_trans, bda)
        g, cams = self._geometry, self.input_spec["image"][0][1]
        voxels = g.num_voxels(self.batch)
        frustum = g.num_points(self.batch, cams) - voxels  # depth entries: B * N * D * fH * fW
        fH, fW = g.feature_size
        check_ranks(ranks.ranks_depth, ranks.ranks_feat, ranks.ranks_bev, ranks.interval_starts,
                    ranks.interval_lengths, num_depth=frustum, num_pixels=self.batch * cams * fH * fW,
                    num_voxels=voxels)
        return ranks

    def decode(self, outputs: dict[str, Tensor], bev2lidar: Tensor | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Boxes per sample by the model's own decoder, rebuilt from the config in the metadata.

        BEVFormer: the NMS-free coder. BEVDet: the CenterPoint decoder with its Scale-NMS, boxes moved
        to the LiDAR frame by ``bev2lidar`` ([B, 4, 4], see ``BEVDet.decode``).
        """
        if self._coder is None:
            cfg = self._model_config()
            if self.family == "bevdet":
                from bevdeploy.models.bevdet import CenterPointDecoder

                self._coder = CenterPointDecoder(cfg)
            else:
                from bevdeploy.models.bevformer import NMSFreeCoder

                self._coder = NMSFreeCoder(post_center_range=cfg.post_center_range, max_num=cfg.max_num,
                                           score_threshold=cfg.score_threshold, num_classes=cfg.num_classes)
        if self.family == "bevdet":
            return self._coder.decode_to_lidar(outputs, bev2lidar)
        return self._coder.decode(outputs["all_cls_scores"], outputs["all_bbox_preds"])

    def __repr__(self) -> str:
        m = self.metadata
        return (f"Engine({self.path.name}: {m['model']} {m['precision']}, {self.file_mb:.1f} MB, "
                f"{m.get('int8_layers', 0)} int8 layers, device={self.device})")
