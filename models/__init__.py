"""softmask models: pure PyTorch masked diffusion LM with soft-masking. No ray/deepspeed/distributed imports."""
from models.checkpoint import load_pretrained, read_config, save_pretrained
from models.config import FLAVORS, ModelConfig
from models.diffusion_lm import DiffusionLM, build_model
from models.hf_backbone import HFDiffusionConfig, HFDiffusionLM
from models.registry import BACKBONES, build_from_config, config_from_dict

__all__ = ["BACKBONES", "FLAVORS", "DiffusionLM", "HFDiffusionConfig", "HFDiffusionLM", "ModelConfig",
           "build_from_config", "build_model", "config_from_dict", "load_pretrained", "read_config", "save_pretrained"]
