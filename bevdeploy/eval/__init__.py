"""Evaluation: accuracy (nuScenes NDS/mAP by the devkit's own code, :mod:`bevdeploy.eval.nuscenes`) and benchmarks."""
