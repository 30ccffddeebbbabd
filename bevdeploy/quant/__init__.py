"""INT8 post-training quantization: calibration and the int8 execution layer.

* ``bevdeploy.quant.calib`` / ``bevdeploy.quant.calibrate``: activation-range calibrators
  (entropy/KL, minmax, percentile) producing per-tensor input scales, saved as a scales table.
* ``bevdeploy.quant.int8_kernels``: the Triton kernels the int8 layers run on, registered as
  ``torch.ops.bevdeploy.quantize_per_tensor``, ``int8_linear`` and ``int8_conv2d`` (int8 x int8 ->
  int32 tensor-core dot on K-contiguous operands, fused dequant/bias/residual/activation epilogue).
* ``bevdeploy.quant.modules``: the conversion step: ``QuantLinear`` / ``QuantConv2d`` built from
  float layers and calibrated scales, ``fold_bn``, and ``quantize_modules`` (swap in place and
  report which precision every layer really runs in).
* ``bevdeploy.quant.chain``: ``chain_int8``, the rewrite after conversion that keeps activations
  int8 between int8 layers (requantizing epilogues, fused ReLU and ResNet residuals; the image
  backbone and neck, BEVDet's BEV encoder, BEVFormer's encoder FFNs; YOLOX's backbone, PAFPN and
  head, with the bottleneck identity added after the fused SiLU).
* ``bevdeploy.quant.autotune``: build-time launch tuning of the int8 layers on the GPU.
* ``bevdeploy.quant.fp8_kernels`` / ``bevdeploy.quant.fp8_modules``: the same for e4m3 (fp8):
  ``torch.ops.bevdeploy.quantize_fp8``, ``fp8_linear`` (``torch._scaled_mm`` on CUDA where its layout
  rules hold) and ``fp8_conv2d`` (Triton fp8 implicit GEMM); ``Fp8Linear`` / ``Fp8Conv2d`` and
  ``quantize_modules_fp8`` (input scales ``amax / 448`` from the same calibration tables).

Nothing is imported here: import the submodule you need.
"""
