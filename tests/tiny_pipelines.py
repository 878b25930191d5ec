"""Each new family's real diffusers pipeline, around the family's tiny VAE, with a tiny denoiser and no text encoder.

The pipelines take precomputed prompt embeddings, so no tokenizer or text model
(and no download) is needed; one denoising step makes a latent that is the
pipeline's own, in the layout and normalisation it hands to `vae.decode`.
Each builder returns the pipeline and the arguments of its call.
"""

from __future__ import annotations

import diffusers as d
import torch
from conftest import seeded
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

HEIGHT, WIDTH = 64, 32  # sides every family's compression (up to 32) divides
NO_TEXT_ENCODERS = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)  # embeddings given


def _size(frames: int | None = None) -> dict:
    return dict(height=HEIGHT, width=WIDTH, **({"num_frames": frames} if frames else {}))


def sd3(vae):
    transformer = d.SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=16,
    )
    pipe = d.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return pipe, dict(
        prompt_embeds=seeded(1, 8, 32, seed=1),
        pooled_prompt_embeds=seeded(1, 64, seed=2),
        guidance_scale=1.0,
        **_size(),
    )


def cogview4(vae):
    transformer = d.CogView4Transformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=16,
        condition_dim=4,
        pos_embed_max_size=16,
        sample_size=16,
        rope_axes_dim=(4, 4),
    )
    pipe = d.CogView4Pipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler()
    )
    return pipe, dict(prompt_embeds=seeded(1, 8, 32, seed=1), guidance_scale=1.0, **_size())


def flux2(vae):
    transformer = d.Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
    )
    pipe = d.Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    return pipe, dict(prompt_embeds=seeded(1, 8, 16, seed=1), guidance_scale=1.0, **_size())


def qwenimage(vae):
    transformer = d.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    pipe = d.QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    return pipe, dict(
        prompt_embeds=seeded(1, 8, 16, seed=1),
        prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long),
        true_cfg_scale=1.0,
        **_size(),
    )


def _sd_unet(**extra):
    return d.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        **extra,
    )


def tiny_clip(folder):
    """A tiny CLIP text encoder and a tokenizer of a few words (written to `folder`): a pipeline that takes a prompt,
    with no download."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["<|startoftext|>", "<|endoftext|>", "a</w>", "photo</w>", "of</w>", "cat</w>"]
    (folder / "vocab.json").write_text(json.dumps({word: index for index, word in enumerate(words)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    config = CLIPTextConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(4)
    return CLIPTextModel(config).eval(), tokenizer


def taesd(vae):
    pipe = d.StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=_sd_unet(),
        scheduler=d.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe, dict(prompt_embeds=seeded(1, 8, 16, seed=1), guidance_scale=1.0, **_size())


def taesdxl(vae):
    unet = _sd_unet(
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16
    )
    pipe = d.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=d.EulerDiscreteScheduler(),
    )
    return pipe, dict(
        prompt_embeds=seeded(1, 8, 16, seed=1),
        pooled_prompt_embeds=seeded(1, 16, seed=2),
        guidance_scale=1.0,
        **_size(),
    )


def taef1(vae):
    transformer = d.FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    pipe = d.FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    return pipe, dict(
        prompt_embeds=seeded(1, 8, 32, seed=1),
        pooled_prompt_embeds=seeded(1, 32, seed=2),
        guidance_scale=1.0,
        **_size(),
    )


def _wan_transformer(in_channels: int, out_channels: int, **extra):
    return d.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=16,
        freq_dim=32,
        ffn_dim=16,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        **extra,
    )


def wan22(vae):
    # TI2V-5B runs WanPipeline with expand_timesteps, as its model_index.json says; Wan 2.1 without.
    channels = vae.config.z_dim
    pipe = d.WanPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=_wan_transformer(channels, channels),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        expand_timesteps=channels == 48,
    )
    return pipe, dict(prompt_embeds=seeded(1, 8, 16, seed=1), guidance_scale=1.0, **_size(9))


def hunyuanvideo(vae):
    transformer = d.HunyuanVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    pipe = d.HunyuanVideoPipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        **NO_TEXT_ENCODERS,
    )
    return pipe, dict(
        prompt_embeds=seeded(1, 8, 16, seed=1),
        pooled_prompt_embeds=seeded(1, 8, seed=2),
        prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        guidance_scale=1.0,
        **_size(9),
    )


def hunyuanvideo15(vae):
    transformer = d.HunyuanVideo15Transformer3DModel(
        in_channels=32 * 2 + 1,
        out_channels=32,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=16,
        image_embed_dim=16,
        rope_axes_dim=(2, 2, 4),
    )
    pipe = d.HunyuanVideo15Pipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        **NO_TEXT_ENCODERS,
        guider=d.ClassifierFreeGuidance(guidance_scale=1.0, enabled=False),
    )
    mask = torch.ones(1, 8, dtype=torch.long)
    return pipe, dict(
        prompt_embeds=seeded(1, 8, 16, seed=1),
        prompt_embeds_mask=mask,
        prompt_embeds_2=seeded(1, 8, 16, seed=2),
        prompt_embeds_mask_2=mask,
        **_size(9),
    )


def ltxvideo(vae):
    transformer = d.LTXVideoTransformer3DModel(
        in_channels=128,
        out_channels=128,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    )
    pipe = d.LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    return pipe, dict(
        prompt_embeds=seeded(1, 8, 32, seed=1),
        prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        guidance_scale=1.0,
        **_size(17),
    )


def cogvideox(vae):
    transformer = d.CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=16,
        out_channels=16,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=4,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
    )
    pipe = d.CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=d.CogVideoXDDIMScheduler()
    )
    return pipe, dict(prompt_embeds=seeded(1, 8, 32, seed=1), guidance_scale=1.0, **_size(9))


def sana(vae):
    transformer = d.SanaTransformer2DModel(
        patch_size=1,
        in_channels=32,
        out_channels=32,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=32,
    )
    pipe = d.SanaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler()
    )
    return pipe, dict(
        prompt_embeds=seeded(1, 8, 8, seed=1),
        prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        guidance_scale=1.0,
        use_resolution_binning=False,
        **_size(),
    )


def mochi(vae):
    transformer = d.MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        pooled_projection_dim=16,
        in_channels=12,
        text_embed_dim=32,
        time_embed_dim=4,
        max_sequence_length=8,
    )
    pipe = d.MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    return pipe, dict(
        prompt_embeds=seeded(1, 8, 32, seed=1),
        prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        guidance_scale=1.0,
        num_inference_steps=2,  # its linear-quadratic schedule divides by the step count less one
        **_size(7),
    )


def easyanimate(vae):
    transformer = d.EasyAnimateTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        time_embed_dim=2,
        text_embed_dim=16,
        num_layers=1,
        sample_width=16,
        sample_height=16,
        patch_size=2,
    )
    pipe = d.EasyAnimatePipeline(
        vae=vae, text_encoder=None, tokenizer=None, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler()
    )
    return pipe, dict(
        prompt_embeds=seeded(1, 8, 16, seed=1),
        prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        guidance_scale=1.0,
        **_size(9),
    )


def stableaudio(vae):
    """StableAudioPipeline as its own tests build it, four latent steps long (8192 samples), no text encoder."""
    transformer = d.StableAudioDiTModel(
        sample_size=4,
        in_channels=64,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        num_key_value_attention_heads=2,
        out_channels=64,
        cross_attention_dim=4,
        time_proj_dim=8,
        global_states_input_dim=8,
        cross_attention_input_dim=4,
    )
    projection = d.StableAudioProjectionModel(text_encoder_dim=4, conditioning_dim=4, min_value=0, max_value=32)
    pipe = d.StableAudioPipeline(
        vae=vae,
        text_encoder=None,
        projection_model=projection,
        tokenizer=None,
        transformer=transformer,
        scheduler=d.EDMDPMSolverMultistepScheduler(),  # the cosine one needs torchsde
    )
    return pipe, dict(prompt_embeds=seeded(1, 3, 4, seed=1), guidance_scale=1.0, audio_end_in_s=0.15)


def stableaudio3(vae):
    """StableAudio3Pipeline, three latent steps of 4096 samples, a quarter second kept; no text encoder."""
    from diffusers.pipelines.stable_audio_3.modeling_stable_audio_3 import StableAudio3DurationEmbedder

    transformer = d.StableAudio3DiTModel(
        io_channels=256,
        embed_dim=16,
        depth=1,
        num_heads=2,
        cond_token_dim=8,
        global_cond_dim=8,
        local_add_cond_dim=257,
        timestep_features_dim=8,
        num_memory_tokens=2,
    )
    pipe = d.StableAudio3Pipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        duration_embedder=StableAudio3DurationEmbedder(output_dim=8, fourier_dim=8),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    embeds = dict(prompt_embeds=seeded(1, 3, 8, seed=1), encoder_attention_mask=torch.ones(1, 3, dtype=torch.long))
    return pipe, dict(**embeds, duration=0.25, num_inference_steps=2)


def hunyuanimage21(vae):
    """HunyuanImagePipeline as its own tests build it (distilled: no guider), embeddings for both text encoders."""
    transformer = d.HunyuanImageTransformer2DModel(
        in_channels=64,
        out_channels=64,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=(1, 1),
        guidance_embeds=False,
        text_embed_dim=8,
        text_embed_2_dim=8,
        rope_axes_dim=(4, 4),
    )
    pipe = d.HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        vae=vae,
        transformer=transformer,
        **NO_TEXT_ENCODERS,
    )
    embeds = dict(
        prompt_embeds=seeded(1, 3, 8, seed=1),
        prompt_embeds_mask=torch.ones(1, 3, dtype=torch.long),
        prompt_embeds_2=seeded(1, 3, 8, seed=2),
        prompt_embeds_mask_2=torch.ones(1, 3, dtype=torch.long),
    )
    return pipe, dict(**embeds, distilled_guidance_scale=None, **_size())


def hunyuanimage21refiner(vae):
    """HunyuanImageRefinerPipeline: it encodes the image it refines (a sample of the distribution), conditions on it,
    and decodes; its denoiser takes the noisy and the image latents, 64 channels each."""
    transformer = d.HunyuanImageTransformer2DModel(
        in_channels=128,
        out_channels=64,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=(1, 1, 1),
        guidance_embeds=True,
        text_embed_dim=8,
        rope_axes_dim=(2, 2, 4),
    )
    pipe = d.HunyuanImageRefinerPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    embeds = dict(prompt_embeds=seeded(1, 3, 8, seed=1), prompt_embeds_mask=torch.ones(1, 3, dtype=torch.long))
    return pipe, dict(image=_image(), **embeds, num_inference_steps=2, **_size())


def allegro(vae):
    """AllegroPipeline: 24 frames of 128x128, one of the tiny VAE's tiles (6 latent frames of 16x16)."""
    transformer = d.AllegroTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=12,  # its rotary embedding splits a head in three
        in_channels=4,
        out_channels=4,
        num_layers=1,
        cross_attention_dim=24,
        sample_width=8,
        sample_height=8,
        sample_frames=8,
        caption_channels=24,
    )
    vae.enable_tiling()  # as its docstring does: the untiled decode raises
    pipe = d.AllegroPipeline(
        transformer=transformer, vae=vae, scheduler=d.DDIMScheduler(), text_encoder=None, tokenizer=None
    )
    embeds = dict(prompt_embeds=seeded(1, 8, 24, seed=1), prompt_attention_mask=torch.ones(1, 8, dtype=torch.long))
    return pipe, dict(**embeds, guidance_scale=1.0, height=128, width=128, num_frames=24)


def svd(vae):
    """StableVideoDiffusionPipeline as its own tests build it: an image in, three frames out, decoded as one chunk."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = d.UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=8,
        projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        intermediate_size=37,
    )
    pipe = d.StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=CLIPVisionModelWithProjection(vision).eval(),
        unet=unet,
        scheduler=d.EulerDiscreteScheduler(
            prediction_type="v_prediction", use_karras_sigmas=True, timestep_type="continuous", sigma_max=700.0
        ),
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )
    return pipe, dict(image=_image(), **_size(3), decode_chunk_size=3, num_inference_steps=2)


class StubQwenProcessor:
    """What QwenImage21Pipeline's __init__ reads from its Qwen3-VL processor (the system prompt's token count, the
    image token's id); with prompt embeddings given, nothing else of it runs."""

    class tokenizer:  # noqa: N801  (the processor's attribute)
        @staticmethod
        def encode(text: str) -> list[int]:
            return [7]

    def apply_chat_template(self, *args, **kwargs) -> list[list[int]]:
        return [[1, 2, 3]]


def qwenimage21(vae):
    transformer = d.QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=64,
        out_channels=64,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = d.QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        processor=StubQwenProcessor(),
        transformer=transformer,
    )
    return pipe, dict(prompt_embeds=seeded(1, 8, 32, seed=1), **_size())


class PassingGuardrail:
    """Cosmos' safety checker, which its pipelines require, letting everything through (diffusers' own tests use one
    the same): the pipeline still rounds the frames to uint8 around it, as with the real guardrail."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


def cosmos(vae, in_channels: int = 16):
    transformer = d.CosmosTransformer3DModel(
        in_channels=in_channels,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        mlp_ratio=2,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        concat_padding_mask=False,  # the padding mask is resized with torchvision, which the tests do without
    )
    # The scheduler CosmosTextToWorldPipeline ships with (diffusers' conversion script): sigma_data 0.5
    scheduler = d.EDMEulerScheduler(sigma_min=0.002, sigma_max=80, sigma_data=0.5, sigma_schedule="karras", rho=7.0)
    pipe = d.CosmosTextToWorldPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        safety_checker=PassingGuardrail(),
    )
    return pipe, dict(prompt_embeds=seeded(1, 8, 32, seed=1), guidance_scale=1.0, **_size(9))


def ltx2(vae, sound=None):
    """LTX2Pipeline as its own tests build it, around LTX-2's tiny video VAE and its tiny audio VAE and vocoder
    (conftest.Ltx2Sound: the same seeded weights as the server's ltx2audio), with precomputed prompt embeddings."""
    from conftest import Ltx2Sound
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    sound = sound or Ltx2Sound()
    transformer = d.LTX2VideoTransformer3DModel(
        in_channels=128,
        out_channels=128,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=128,  # 8 latent channels x 16 latent mel bins, packed
        audio_out_channels=128,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=1,
        qk_norm="rms_norm_across_heads",
        caption_channels=32,
        rope_double_precision=False,
        rope_type="split",
    )
    connectors = LTX2TextConnectors(
        caption_channels=32,
        text_proj_in_factor=2,
        video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32,
        rope_theta=10000.0,
        rope_double_precision=False,
        causal_temporal_positioning=False,
        rope_type="split",
    )
    pipe = d.LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        audio_vae=sound.audio_vae,
        text_encoder=None,
        tokenizer=None,
        connectors=connectors.eval(),
        transformer=transformer,
        vocoder=sound.vocoder,
    )
    return pipe, dict(
        prompt_embeds=seeded(1, 8, 64, seed=1),  # the text encoder's 32 features of 2 layers, flattened
        prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        # no guidance of any kind (as its own tests pin them), so no negative prompt is needed
        guidance_scale=1.0,
        stg_scale=0.0,
        modality_scale=1.0,
        guidance_rescale=0.0,
        audio_guidance_scale=1.0,
        audio_stg_scale=0.0,
        audio_modality_scale=1.0,
        audio_guidance_rescale=0.0,
        spatio_temporal_guidance_blocks=None,
        use_cross_timestep=False,
        frame_rate=24.0,
        height=64,  # two latent cells a side: the decoder's reflect padding needs two
        width=64,
        num_frames=9,
    )


def ltx2audio(audio_vae):
    """LTX2Pipeline around LTX-2's tiny video VAE (conftest.tiny_ltx2_vae) and `audio_vae`: the tiny one (its vocoder
    the tiny one's), or a RemoteVae of ltx2audio (its vocoder: the RemoteVae's stand-in, the server having run it)."""
    from conftest import Ltx2Sound, tiny_ltx2_vae

    sound = Ltx2Sound()
    sound.vocoder = getattr(audio_vae, "vocoder", None) or sound.vocoder
    sound.audio_vae = audio_vae
    return ltx2(tiny_ltx2_vae(), sound)


class StubTokenizer:
    """A tokenizer of a few ids for AceStepPipeline, which takes prompts, not embeddings: ids from a text's letters."""

    def __call__(self, texts: list[str], **kwargs):
        ids = torch.tensor([[(sum(map(ord, text)) + i) % 32 for i in range(6)] for text in texts])
        return type("Tokens", (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})()


class StubTextEncoder(torch.nn.Module):
    """AceStepPipeline's text encoder as it uses one: hidden states of the prompt's ids, and their embedding layer."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)

    def forward(self, input_ids: torch.Tensor):
        return type("Encoded", (), {"last_hidden_state": 2 * self.embed(input_ids)})()

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype


def acestep(vae):
    """AceStepPipeline around ACE-Step's tiny VAE, with a tiny DiT and condition encoder and stub text encoding, for
    0.2 s of sound (5 latent steps)."""
    transformer = d.AceStepTransformer1DModel(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        encoder_hidden_size=32,
    )
    condition_encoder = d.AceStepConditionEncoder(
        hidden_size=32,
        intermediate_size=64,
        text_hidden_dim=16,
        num_lyric_encoder_hidden_layers=1,
        num_timbre_encoder_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    pipe = d.AceStepPipeline(
        vae=vae,
        text_encoder=StubTextEncoder().eval(),
        tokenizer=StubTokenizer(),
        transformer=transformer,
        condition_encoder=condition_encoder.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return pipe, dict(prompt="a song", audio_duration=0.2, guidance_scale=1.0)


def _peak_at_minus_1_dbfs(audio: torch.Tensor) -> torch.Tensor:
    """AceStepPipeline after `vae.decode`: a clip whose peak passes 1 divided by it, then every clip's peak set to -1
    dBFS."""
    audio = audio.float()
    audio = audio / audio.abs().amax(dim=[1, 2], keepdim=True).clamp(min=1.0)
    return audio * (10.0 ** (-1.0 / 20.0) / audio.abs().amax(dim=[1, 2], keepdim=True).clamp(min=1e-6))


# What a pipeline returns, where it is not its `frames`, `audios` or `images`: LTX-2's sound, for ltx2audio
OUTPUTS = {"ltx2audio": "audio"}


# Where a pipeline's own output is not the decoded pixels to float precision: Cosmos' guardrail pass makes the
# frames uint8 (truncating) and back, one level at most below the decode's
PIXEL_TOLERANCE = {"cosmos": dict(atol=1 / 255 + 1e-4, rtol=0)}


# What an audio pipeline does to `vae.decode(latents).sample` before it returns (`samples`: the length it keeps)
AUDIO_AFTER_DECODE = {
    "stableaudio": lambda audio, samples: audio[:, :, :samples],  # cropped to audio_end_in_s
    "stableaudio3": lambda audio, samples: audio[:, :, :samples].clamp(-1.0, 1.0),  # cropped to duration, clipped
    "ltx2audio": lambda audio, samples: audio,  # the vocoder's output as it is
    "acestep": lambda audio, samples: _peak_at_minus_1_dbfs(audio),
}


PIPELINES = {
    "sd15": taesd,  # taesd is SD1.5's preview decoder: the same pipeline
    "sdxl": taesdxl,
    "flux": taef1,
    "wan21": wan22,
    "hunyuanvideo": hunyuanvideo,
    "sd3": sd3,
    "flux2": flux2,
    "qwenimage": qwenimage,
    "taesd": taesd,
    "taesdxl": taesdxl,
    "taef1": taef1,
    "wan22": wan22,
    "hunyuanvideo15": hunyuanvideo15,
    "ltxvideo": ltxvideo,
    "cogvideox": cogvideox,
    "sana": sana,
    "mochi": mochi,
    "easyanimate": easyanimate,
    "hunyuanimage21": hunyuanimage21,
    "hunyuanimage21refiner": hunyuanimage21refiner,
    "svd": svd,
    "allegro": allegro,
    "cosmos": cosmos,
    "qwenimage21": qwenimage21,
    "stableaudio": stableaudio,
    "stableaudio3": stableaudio3,
    "ltx2": ltx2,
    "ltx2audio": ltx2audio,
    "acestep": acestep,
    "cogview4": cogview4,
}


def run(family: str, vae, output_type: str, **extra) -> torch.Tensor:
    """The family's pipeline run once with `output_type` (and `extra` arguments), the same seed every time: images, or
    videos [B, F, 3, H, W]."""
    torch.manual_seed(0)
    pipe, arguments = PIPELINES[family](vae)
    pipe.transformer.eval() if hasattr(pipe, "transformer") else pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    steps = arguments.pop("num_inference_steps", 1)
    output = pipe(
        **arguments,
        **extra,
        num_inference_steps=steps,
        output_type=output_type,
        generator=torch.Generator().manual_seed(3),
    )
    if family in OUTPUTS:
        return getattr(output, OUTPUTS[family])
    return output.frames if hasattr(output, "frames") else output.audios if hasattr(output, "audios") else output.images


# -- image to image, image to video: the pipelines that encode, and sample the encoder's distribution -----------


def _image():
    """A seeded HEIGHT x WIDTH RGB image, the input of the image-to-image pipelines."""
    import numpy as np
    import PIL.Image

    pixels = (np.random.default_rng(5).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels)


def _from_image(text_to_image, pipeline_class, **config):
    """The image-to-image pipeline over a text-to-image one's components, with its arguments and an image."""
    pipe, arguments = text_to_image
    arguments = {name: value for name, value in arguments.items() if name not in ("height", "width")}
    return pipeline_class(**pipe.components, **config), dict(arguments, image=_image(), strength=0.5)


def sd15_img2img(vae):
    return _from_image(taesd(vae), d.StableDiffusionImg2ImgPipeline)


def sdxl_img2img(vae):
    return _from_image(taesdxl(vae), d.StableDiffusionXLImg2ImgPipeline, requires_aesthetics_score=False)


def flux_img2img(vae):
    return _from_image(taef1(vae), d.FluxImg2ImgPipeline)


def wan21_image_to_video(vae):
    # Wan 2.2 I2V-A14B (the Wan 2.1 VAE): the image's latent (the encoder's mode) joins the noise; two experts, no
    # CLIP image encoder
    pipe = d.WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        image_processor=None,
        image_encoder=None,
        transformer=_wan_transformer(16 + 4 + 16, 16),
        transformer_2=_wan_transformer(16 + 4 + 16, 16),
        boundary_ratio=0.9,
    )
    return pipe, dict(image=_image(), prompt_embeds=seeded(1, 8, 16, seed=1), guidance_scale=1.0, **_size(9))


def cosmos_video_to_world(vae):
    # The image's latent comes from an identity distribution (the encoder's output itself), normalised per frame; the
    # denoiser also takes the conditioning mask, a channel more
    pipe, arguments = cosmos(vae, in_channels=17)
    pipe = d.CosmosVideoToWorldPipeline(**pipe.components)
    return pipe, dict(arguments, image=_image())


IMAGE_PIPELINES = {
    "sd15": sd15_img2img,
    "sdxl": sdxl_img2img,
    "flux": flux_img2img,
    "wan21": wan21_image_to_video,
    "cosmos": cosmos_video_to_world,
}


def run_from_image(family: str, vae, output_type: str):
    """The family's image-to-image (or image-to-video) pipeline run once, the same seeds every time."""
    torch.manual_seed(0)
    pipe, arguments = IMAGE_PIPELINES[family](vae)
    pipe.set_progress_bar_config(disable=True)
    output = pipe(
        **arguments, num_inference_steps=2, output_type=output_type, generator=torch.Generator().manual_seed(3)
    )
    return output.frames if hasattr(output, "frames") else output.audios if hasattr(output, "audios") else output.images
