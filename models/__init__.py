"""softmask models: pure PyTorch masked diffusion LM with soft-masking. No ray/deepspeed/distributed imports."""
from models.checkpoint import load_pretrained, read_config, save_pretrained
from models.config import FLAVORS, ModelConfig
from models.diffusion_lm import DiffusionLM, build_model

__all__ = ["FLAVORS", "DiffusionLM", "ModelConfig", "build_model", "load_pretrained", "read_config", "save_pretrained"]
