"""Quantization tools: `lmq awq` (AWQ 4-bit, AutoAWQ "GEMM" checkpoints) and the packed format
both engines read."""
