"""Names the dead-code check (vulture, run by scripts/test.sh) cannot see being used.

Not a test module: vulture reads it, nothing imports it.
"""
# ComfyUI's node contract: read by the host from every node class
DESCRIPTION, RETURN_TYPES, OUTPUT_TOOLTIPS, FUNCTION, CATEGORY
_.INPUT_TYPES
# comfy.sd.VAE members the core nodes and the memory manager read (nodes/comfy_vae.py sets them)
_.crop_input, _.disable_offload, _.downscale_index_formula, _.upscale_index_formula, _.downscale_ratio
_.upscale_ratio, _.extra_1d_channel, _.latent_dim, _.not_video, _.output_channels, _.output_device
_.process_input, _.process_output, _.memory_used_decode, _.memory_used_encode
# nn.Module.forward is called through __call__
_.forward
# aiohttp route handlers are registered by decorator
_tile_plan, _search_aliases
# public API of vae_core (README "Python API"), used by scripts and other packs
_.decode_diffusion
_.scale_latents, _.unscale_latents  # AutoencoderTiny's 8-bit latent storage, as diffusers has it
pack_2x2
# the latent cache: the sampler protocol trainers call each epoch, and Ray Data's context options it sets
_.set_epoch, _.enable_progress_bars, _.print_on_execution_start
