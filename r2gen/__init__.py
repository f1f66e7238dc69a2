"""r2gen-precision: R2Gen (Chen et al., EMNLP 2020) trained and compared at fp32, fp16, bf16 and fp8."""

__version__ = "0.1.0"
