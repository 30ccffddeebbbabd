"""Soak test of the BEVFormer-tiny engine on the GPU: 2000 steps, a scene change every 40 steps.

Checks that device memory stays flat after warm-up (max - min of torch.cuda.memory_allocated and
of the used memory from mem_get_info, both < 1 MB) and that every scene's first frame was reset
(the step's prev_bev fed to the engine was zeros with the gate closed). Frames repeat (a few
preprocessed synthetic frames cycled). Prints the numbers and exits non-zero on a failure.
"""

import argparse
import sys
import time

import torch

from bevdeploy.data.nuscenes import load_infos
from bevdeploy.data.preprocess import BEVFORMER_TINY, prepare_frame
from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, generate
from bevdeploy.engine import Engine, build


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--scene-len", type=int, default=40)
    p.add_argument("--precision", default="fp16x2")
    p.add_argument("--work", default="out/soak")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check the script on a CPU: reduced model and images, no memory numbers")
    args = p.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_soak: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    overrides = dict(image_size=(64, 96), bev_h=8, bev_w=8, num_query=20, num_encoder_layers=1,
                     num_decoder_layers=1) if smoke else None
    root = f"{args.work}/world"
    generate(root, num_scenes=1, samples_per_scene=4, seed=0, progress=False,
             **({"image_size": (128, 192)} if smoke else {}))
    infos = load_infos(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)
    frames = [prepare_frame(infos[i], infos[i - 1] if i else None, BEVFORMER_TINY) for i in range(len(infos))]
    path = build("bevformer-tiny", args.precision, out=f"{args.work}/tiny-{args.precision}.engine", progress=False,
                 model_overrides=overrides, device="cpu" if smoke else None)
    engine = Engine.load(path, device="cpu" if smoke else None)

    resets = []  # per step: was the prev_bev fed zeros with the gate closed?
    engine_call = Engine.__call__

    def spy(self, **inputs):  # step() calls self(...): record what it feeds
        resets.append(float(inputs["use_prev_bev"].reshape(-1)[0]) == 0.0 and not bool(inputs["prev_bev"].any()))
        return engine_call(self, **inputs)

    Engine.__call__ = spy
    alloc, used = [], []
    warmup = 50
    t0 = time.time()
    try:
        for i in range(args.steps):
            scene = i // args.scene_len
            frame = dict(frames[i % len(frames)], scene_token=f"scene-{scene}", token=f"s{scene}-f{i % args.scene_len}",
                         use_prev_bev=torch.ones(1) if i % args.scene_len else torch.zeros(1))
            out = engine.step(frame)
            if i >= warmup and i % 10 == 0 and not smoke:
                torch.cuda.synchronize()
                free, total = torch.cuda.mem_get_info()
                alloc.append(torch.cuda.memory_allocated())
                used.append(total - free)
            assert torch.isfinite(out["bev_embed"]).all(), f"step {i}: non-finite bev_embed"
    finally:
        Engine.__call__ = engine_call
    if not smoke:
        torch.cuda.synchronize()
    secs = time.time() - t0
    firsts = [i for i in range(args.steps) if i % args.scene_len == 0]
    missed = [i for i in firsts if not resets[i]]
    spurious = [i for i in range(args.steps) if i % args.scene_len and resets[i]]
    d_alloc, d_used = (max(alloc) - min(alloc), max(used) - min(used)) if alloc else (0, 0)
    where = "the CPU (smoke)" if smoke else torch.cuda.get_device_name()
    print(f"gpu_soak: {args.steps} steps of {path} ({args.precision}) on {where} in {secs:.1f} s")
    print(f"  memory_allocated max-min after warm-up: {d_alloc} B; mem_get_info used max-min: {d_used} B "
          f"({len(alloc)} samples)")
    print(f"  scenes: {len(firsts)}, first frames reset: {len(firsts) - len(missed)}/{len(firsts)}, "
          f"resets elsewhere: {len(spurious)}")
    ok = d_alloc < 2**20 and d_used < 2**20 and not missed and not spurious
    print("  PASS" if ok else "  FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
