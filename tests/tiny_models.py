"""Tiny random-weight diffusers models and pipelines saved to disk, for the loading and CLI tests."""

import json
from pathlib import Path

import torch


def tiny_unet2d(num_class_embeds=None):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                       num_class_embeds=num_class_embeds)


def tiny_unet2d_condition():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                norm_num_groups=4, attention_head_dim=4)


def tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4)


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                 pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16)


def ddpm_pipeline(folder: Path, prediction_type: str = "epsilon") -> Path:
    """DDPMPipeline.save_pretrained with a tiny UNet2DModel and a DDPMScheduler."""
    from diffusers import DDPMPipeline, DDPMScheduler

    sched = DDPMScheduler(prediction_type=prediction_type, clip_sample=False)
    DDPMPipeline(unet=tiny_unet2d(), scheduler=sched).save_pretrained(folder)
    return Path(folder)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), shift_factor=0.1)


def write_pipeline(folder: Path, pipeline_class: str, component: str, model, scheduler, vae=None) -> Path:
    """A pipeline folder holding only the denoiser, the scheduler and optionally the VAE (no text encoders)."""
    folder = Path(folder)
    model.save_pretrained(folder / component)
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1",
             component: ["diffusers", type(model).__name__], "scheduler": ["diffusers", type(scheduler).__name__]}
    if vae is not None:
        vae.save_pretrained(folder / "vae")
        index["vae"] = ["diffusers", type(vae).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def sd_like_pipeline(folder: Path) -> Path:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    return write_pipeline(folder, "StableDiffusionPipeline", "unet", tiny_unet2d_condition(), sched)


def sd3_like_pipeline(folder: Path, vae: bool = False) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return write_pipeline(folder, "StableDiffusion3Pipeline", "transformer", tiny_sd3(),
                          FlowMatchEulerDiscreteScheduler(shift=3.0), tiny_vae() if vae else None)


def dit_pipeline(folder: Path) -> Path:
    from diffusers import DDIMScheduler

    return write_pipeline(folder, "DiTPipeline", "transformer", tiny_dit(), DDIMScheduler(clip_sample=False))
