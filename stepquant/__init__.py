"""stepquant: convert Hugging Face MoE checkpoints to BF16, FP8 and NVFP4, check them, verify and publish."""

__version__ = "0.1.0"
