"""Triton kernels for the expert GEMMs, one concept per module:

  fp8_grouped  FP8 grouped GEMMs with DeepSeek-V3's scales (m-grouped: forward and dgrad;
               k-grouped: wgrad), in the style of DeepGEMM. sm89 (Ada) and sm90 (Hopper). With one
               group they are also the dense FP8 linear's "triton" kernel (sm89).
  fp8_quant    fused FP8 quantizers (1x128, 128x1, the 1x128 -> 128x1 re-tiling, per expert segment),
               one launch each, bit-identical to model/fp8.py.
  ds_grouped   DeepSpeed 0.19.8's Triton grouped GEMM for bf16/fp16 experts on sm80-sm89.

Importing this package does not import triton; each module does, and only the CUDA and
interpreter paths import them (CPU training never needs triton). Under TRITON_INTERPRET=1 the
kernels run on CPU tensors, which is how tests/test_triton_kernels.py checks them.
"""
