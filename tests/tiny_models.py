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


#: The words the tiny CLIP tokenizer knows (each one token); other text falls back to its letters.
TINY_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "blurry", "ugly", "house", "tree")


def tiny_clip_tokenizer(folder: Path, max_length: int = 16):
    """A CLIPTokenizer with a small vocabulary this test suite writes: the letters, the words of TINY_WORDS (with the
    byte-pair merges that build them) and the start / end tokens; saved with save_pretrained."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in letters + [f"{c}</w>" for c in letters]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for word in TINY_WORDS:  # left-to-right merges: w, wo, wor, ... word</w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            merges.append(f"{current} {nxt}")
            current = current + nxt
            vocab.setdefault(current, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    for f in ("vocab.json", "merges.txt"):
        (folder / f).unlink()
    tok.save_pretrained(folder)
    return tok


def tiny_clip_text_encoder(vocab_size: int, hidden: int = 12, max_length: int = 16, projection: int | None = None):
    """A random-weight CLIPTextModel (or CLIPTextModelWithProjection, SDXL's second encoder) of width ``hidden``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(2)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
                            projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def sd15_text_pipeline(folder: Path) -> Path:
    """A tiny random-weight StableDiffusionPipeline (UNet2DConditionModel + CLIPTextModel + CLIPTokenizer + VAE +
    DPMSolverMultistepScheduler), saved with save_pretrained, that diffusers runs with a prompt."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    folder = Path(folder)
    tok = tiny_clip_tokenizer(folder / ".tokenizer-src")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                norm_num_groups=4, attention_head_dim=4)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_clip_text_encoder(len(tok)), tokenizer=tok,
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    import shutil

    shutil.rmtree(folder / ".tokenizer-src")
    return folder


def tiny_t5_tokenizer(folder: Path):
    """A T5Tokenizer (Unigram) with a small vocabulary this test suite writes: pad, eos, unk, the word boundary, the
    words of TINY_WORDS (with the boundary) and the letters; saved with save_pretrained."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in TINY_WORDS]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.save_pretrained(folder)
    return tok


def tiny_t5_encoder(vocab_size: int, d_model: int = 16):
    """A random-weight T5EncoderModel of width ``d_model`` (SD3's third text encoder)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(3)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=4, d_ff=2 * d_model, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def _save_text_pipeline(pipe, folder: Path, sources: list[Path]) -> Path:
    import shutil

    pipe.save_pretrained(folder)
    for src in sources:
        shutil.rmtree(src)
    return folder


def sdxl_text_pipeline(folder: Path) -> Path:
    """A tiny random-weight StableDiffusionXLPipeline: UNet2DConditionModel with addition_embed_type "text_time",
    CLIPTextModel (width 8) + CLIPTextModelWithProjection (width 12, projection 6) whose penultimate hidden states
    concatenate to the cross-attention width 20, two CLIP tokenizers, the VAE and an EulerDiscreteScheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    folder = Path(folder)
    tok = tiny_clip_tokenizer(folder / ".tokenizer-src")
    tok_2 = tiny_clip_tokenizer(folder / ".tokenizer-2-src")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=20,
                                norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 6,
                                transformer_layers_per_block=1)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=tiny_clip_text_encoder(len(tok), hidden=8),
                                     text_encoder_2=tiny_clip_text_encoder(len(tok_2), hidden=12, projection=6),
                                     tokenizer=tok, tokenizer_2=tok_2, unet=unet, scheduler=scheduler)
    return _save_text_pipeline(pipe, folder, [folder / ".tokenizer-src", folder / ".tokenizer-2-src"])


def sd3_text_pipeline(folder: Path) -> Path:
    """A tiny random-weight StableDiffusion3Pipeline: SD3Transformer2DModel (joint width 16, pooled width 16), two
    CLIPTextModelWithProjection (width 8, projection 8 each: pooled 16, penultimate states 8 + 8 padded to 16), a
    T5EncoderModel of width 16, their tokenizers, the VAE and FlowMatchEulerDiscreteScheduler(shift=3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    tok = tiny_clip_tokenizer(folder / ".tokenizer-src")
    tok_2 = tiny_clip_tokenizer(folder / ".tokenizer-2-src")
    tok_3 = tiny_t5_tokenizer(folder / ".tokenizer-3-src")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                                        pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(),
        text_encoder=tiny_clip_text_encoder(len(tok), hidden=8, projection=8), tokenizer=tok,
        text_encoder_2=tiny_clip_text_encoder(len(tok_2), hidden=8, projection=8), tokenizer_2=tok_2,
        text_encoder_3=tiny_t5_encoder(len(tok_3)), tokenizer_3=tok_3)
    return _save_text_pipeline(pipe, folder, [folder / s for s in (".tokenizer-src", ".tokenizer-2-src",
                                                                   ".tokenizer-3-src")])
# ----------------------------------------------------------------------------------------------------------------
# Original (LDM-layout) single files, written from a diffusers pipeline: the inverse of diffusers' single-file
# conversion, from the module layout of the original latent-diffusion code (openaimodel.UNetModel: input_blocks,
# middle_block, output_blocks; autoencoder Encoder / Decoder: down / mid / up; the CLIP text model under
# cond_stage_model.transformer).

_LDM_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def _renamed(rest: str, pairs) -> str:
    head, _, tail = rest.partition(".")
    for new, old in pairs:
        if head == new:
            return f"{old}.{tail}"
    return rest


def _ldm_unet_key(key: str, lpb: int) -> str:
    """The original name of a diffusers UNet2DConditionModel key (``layers_per_block`` = lpb)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for new, old in fixed.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    parts = key.split(".")
    if parts[0] == "down_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "downsamplers":
            return f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.{rest.removeprefix('conv.')}"
        index = (lpb + 1) * i + j + 1
        return f"input_blocks.{index}.0.{_renamed(rest, _LDM_RESNET)}" if kind == "resnets" else \
            f"input_blocks.{index}.1.{rest}"
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * j}.{_renamed(rest, _LDM_RESNET)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "upsamplers":
            return f"output_blocks.{(lpb + 1) * i + lpb}.UPSAMPLE.{rest}"  # .1 or .2: set by the caller
        index = (lpb + 1) * i + j
        return f"output_blocks.{index}.0.{_renamed(rest, _LDM_RESNET)}" if kind == "resnets" else \
            f"output_blocks.{index}.1.{rest}"
    raise KeyError(key)


def _ldm_unet(state: dict, lpb: int) -> dict:
    out = {}
    for key, value in state.items():
        out["model.diffusion_model." + _ldm_unet_key(key, lpb)] = value
    upsamplers = [k for k in out if ".UPSAMPLE." in k]  # after the attention when the block has one, else at .1
    slots = {k: "2" if any(j.startswith(k.split(".UPSAMPLE.")[0] + ".1.") for j in out) else "1" for k in upsamplers}
    for key, slot in slots.items():
        out[key.replace(".UPSAMPLE.", f".{slot}.")] = out.pop(key)
    return out


def _ldm_vae(state: dict, n_blocks: int) -> dict:
    attn = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out", "proj_out"))
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side, rest = parts[0], parts[1:]
        if rest[0] == "conv_norm_out":
            name = f"{side}.norm_out.{rest[1]}"
        elif rest[0] in ("down_blocks", "up_blocks"):
            i = int(rest[1]) if side == "encoder" else n_blocks - 1 - int(rest[1])
            level = "down" if side == "encoder" else "up"
            if rest[2] == "resnets":
                tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                name = f"{side}.{level}.{i}.block.{rest[3]}.{tail}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                name = f"{side}.{level}.{i}.{'downsample' if side == 'encoder' else 'upsample'}.{'.'.join(rest[4:])}"
        elif rest[0] == "mid_block" and rest[1] == "resnets":
            tail = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
            name = f"{side}.mid.block_{int(rest[2]) + 1}.{tail}"
        elif rest[0] == "mid_block":  # attentions.0.<to_q|...>: 1x1 convolutions in the original
            tail = ".".join(rest[3:]).replace("to_out.0", "to_out")
            name = f"{side}.mid.attn_1.{_renamed(tail, attn)}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        else:  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
            name = key
        out["first_stage_model." + name] = value
    return out


def write_original_single_file(pipeline: Path, path: Path, dtype=None) -> Path:
    """The original (LDM-layout) single file of a StableDiffusionPipeline folder: UNet, VAE and CLIP text encoder
    under their original key names, as the SD 1.x checkpoints on model hubs are laid out."""
    from safetensors.torch import save_file

    pipeline = Path(pipeline)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    vae = AutoencoderKL.from_pretrained(pipeline / "vae")
    text = CLIPTextModel.from_pretrained(pipeline / "text_encoder")
    tensors = _ldm_unet(unet.state_dict(), int(unet.config.layers_per_block))
    tensors.update(_ldm_vae(vae.state_dict(), len(vae.config.block_out_channels)))
    for key, value in text.state_dict().items():
        name = key if key.startswith("text_model.") else "text_model." + key
        tensors["cond_stage_model.transformer." + name] = value
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path))
    return Path(path)


def config_only_copy(pipeline: Path, folder: Path) -> Path:
    """A copy of a pipeline folder without its weights (what a model hub's config files are)."""
    import shutil

    shutil.copytree(pipeline, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return Path(folder)
