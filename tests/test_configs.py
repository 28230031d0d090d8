"""Every config a family's module accepts works in every mode (untiled, tiled, auto) or is refused at load time,
over the option space diffusers accepts for each class; and a broken or ill-typed config.json is a VAEError that
names the file and the field. Small widths, several tiles per image, sizes off the tile grid."""
from __future__ import annotations

import json

import pytest
import torch

from vae_core import VAEError, load_vae, tiling
from vae_core.registry import FAMILIES
from vae_core.vae import VAE

TOL = 1e-3


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".weight") and "norm" in name:
            p.data = 1 + 0.2 * torch.randn(p.shape, generator=g)
        else:
            p.data = 0.15 * torch.randn(p.shape, generator=g)
    for name, b in model.named_buffers():  # eval-mode BatchNorm: non-trivial running statistics
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def _vae(family: str, cfg: dict, seed: int = 0) -> VAE:
    mod = FAMILIES[family].module
    return VAE(_randomize(mod.build(cfg), seed), family, "custom", {**mod.DEFAULT_CONFIG, **cfg})


def _check_modes(vae: VAE, monkeypatch, image_hw, tile: int, **decode_kw):
    """Tiled and auto (with too little free memory for one pass) equal untiled, both directions."""
    g = torch.Generator().manual_seed(1)
    h, w = image_hw
    f = vae.downscale
    z = torch.randn(1, vae.latent_channels, h // f, w // f, generator=g)
    x = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    runs = []
    if vae.can_decode:
        runs.append(lambda t: vae.decode(z, tile=t, **decode_kw))
    if vae.can_encode:
        runs.append(lambda t: vae.encode(x, tile=t))
    for run in runs:
        ref = run(False)
        tiled = run(tiling.Tiling(tile))
        with monkeypatch.context() as m:
            m.setattr(tiling, "_free_bytes", lambda device: 1 << 16)  # 64 KiB free: auto must tile
            auto = run(None)
        for name, out in (("tiled", tiled), ("auto", auto)):
            assert out.shape == ref.shape
            diff = (out - ref).abs().max().item()
            assert diff <= TOL, f"{name} vs untiled: max abs diff {diff:.3g}"


KL_BASE = {"block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4}
KL_CONFIGS = {
    "base": {},
    "layers_per_block_2": {"layers_per_block": 2},
    "layers_per_block_3": {"layers_per_block": 3, "block_out_channels": [16, 32]},
    "no_mid_attention": {"mid_block_add_attention": False},
    "no_quant_convs_16ch": {"use_quant_conv": False, "use_post_quant_conv": False, "latent_channels": 16,
                            "norm_num_groups": 4},
    "one_level": {"block_out_channels": [16]},
}


@pytest.mark.parametrize("name", KL_CONFIGS)
def test_kl_configs(name, monkeypatch):
    _check_modes(_vae("kl", {**KL_BASE, **KL_CONFIGS[name]}), monkeypatch, (56, 72), 32)


TINY_BASE = {"encoder_block_out_channels": [8, 8, 8, 8], "decoder_block_out_channels": [8, 8, 8, 8],
             "num_encoder_blocks": [1, 1, 1, 1], "num_decoder_blocks": [1, 1, 1, 1], "latent_channels": 4}
TINY_CONFIGS = {
    "nearest": {},
    "nearest-exact": {"upsample_fn": "nearest-exact"},
    "area": {"upsample_fn": "area"},
    "bilinear": {"upsample_fn": "bilinear"},
    "bicubic": {"upsample_fn": "bicubic"},
    "block_counts": {"num_encoder_blocks": [1, 2, 3, 1], "num_decoder_blocks": [2, 1, 3, 1]},
    "widths": {"encoder_block_out_channels": [8, 12, 16, 16], "decoder_block_out_channels": [16, 12, 8, 8]},
    "pool_gn": {"midblock_group_norm": True},
    "stem_32x": {"encoder_stem_channels": [8, 8], "decoder_block_out_channels": [8, 8, 8, 8, 8, 8],
                 "num_decoder_blocks": [1, 1, 1, 1, 1, 1], "upsample_fn": "bilinear"},
}


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_tiny_configs(name, monkeypatch):
    vae = _vae("tiny", {**TINY_BASE, **TINY_CONFIGS[name]})
    size = (96, 160) if vae.downscale == 32 else (72, 104)
    _check_modes(vae, monkeypatch, size, 32)


def test_tiny_refuses_what_it_cannot_run():
    mod = FAMILIES["tiny"].module
    for bad in ({"upsample_fn": "trilinear"}, {"act_fn": "gelu"}):
        with pytest.raises(VAEError, match="not supported"):
            mod.build({**TINY_BASE, **bad})


def _dc(stages: int, **over) -> dict:
    ch = [8, 16, 32, 32, 32][:stages]
    cfg = {"latent_channels": 8, "attention_head_dim": 8, "encoder_block_out_channels": ch,
           "decoder_block_out_channels": ch, "encoder_layers_per_block": [1] * stages,
           "decoder_layers_per_block": [1] * stages, "encoder_qkv_multiscales": [[]] * stages,
           "decoder_qkv_multiscales": [[]] * stages, "encoder_block_types": ["ResBlock"] * stages,
           "decoder_block_types": ["ResBlock"] * stages, "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu"}
    cfg.update(over)
    return cfg


DC_CONFIGS = {
    "resblocks": _dc(3),
    "vit_stage": _dc(3, encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
                     decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"]),
    "vit_multiscale": _dc(3, encoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
                          decoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
                          encoder_qkv_multiscales=[[], [3], [5]], decoder_qkv_multiscales=[[], [3], [5]]),
    "batch_norm_relu": _dc(3, decoder_norm_types=["batch_norm", "batch_norm", "rms_norm"],
                           decoder_act_fns=["relu", "relu", "silu"]),
    "conv_resamplers": _dc(3, downsample_block_type="Conv", upsample_block_type="interpolate"),
    "no_shortcuts": _dc(3, encoder_out_shortcut=False, decoder_in_shortcut=False),
    "empty_first_stage": _dc(3, encoder_layers_per_block=[0, 1, 1], decoder_layers_per_block=[0, 1, 1]),
    "relu6_gelu": _dc(3, decoder_act_fns=["relu6", "gelu", "mish"], decoder_conv_act_fn="silu"),
}


@pytest.mark.parametrize("name", DC_CONFIGS)
def test_dc_configs(name, monkeypatch):
    vae = _vae("dc", DC_CONFIGS[name])
    assert vae.downscale == 4
    _check_modes(vae, monkeypatch, (60, 76), 32)


def test_dc_refuses_unknown_block_norm_and_activation():
    mod = FAMILIES["dc"].module
    for bad, word in (({"encoder_block_types": "Mamba"}, "block type"), ({"decoder_norm_types": "layer_norm"}, "norm"),
                      ({"decoder_act_fns": "tanhshrink"}, "activation")):
        with pytest.raises(VAEError, match=word):
            mod.build(_dc(3, **bad))


ASYM_BASE = {"down_block_out_channels": [16, 32, 32], "layers_per_down_block": 1, "layers_per_up_block": 1,
             "norm_num_groups": 8, "latent_channels": 4}


@pytest.mark.parametrize("up", [[24, 48, 48], [16, 32, 64], [32, 32, 32], [16, 32, 48]])
def test_asym_up_block_out_channels(up, monkeypatch):
    vae = _vae("asym", {**ASYM_BASE, "up_block_out_channels": up})
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 56, 72, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 56, 72, generator=g) > 0.5).float()
    _check_modes(vae, monkeypatch, (56, 72), 32)
    _check_modes(vae, monkeypatch, (56, 72), 32, image=image, mask=mask)


def test_asym_refuses_decoders_its_condition_encoder_cannot_feed():
    with pytest.raises(VAEError, match="condition features"):
        FAMILIES["asym"].module.build({**ASYM_BASE, "up_block_out_channels": [16, 64, 64]})


# ------------------------------------------------------------------------------------------------ config.json
def _folder(tmp_path, config_text: str):
    from safetensors.torch import save_file

    mod = FAMILIES["kl"].module
    model = mod.build(KL_BASE)
    folder = tmp_path / "vae"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(config_text)
    return folder


def test_config_json_that_is_not_json(tmp_path):
    folder = _folder(tmp_path, '{"_class_name": "AutoencoderKL", "scaling_factor": 0.18215,,}')
    with pytest.raises(VAEError, match=r"config\.json is not valid JSON \(line 1") as e:
        load_vae(folder)
    assert str(folder) in str(e.value)
    (tmp_path / "b").mkdir()
    with pytest.raises(VAEError, match="JSON object"):
        load_vae(_folder(tmp_path / "b", "[1, 2, 3]"))


@pytest.mark.parametrize("field, value, kind", [("scaling_factor", "0.18215", "number"),
                                                ("layers_per_block", "2", "number"),
                                                ("block_out_channels", 128, "list"),
                                                ("force_upcast", "yes", "bool"),
                                                ("shift_factor", [0.1], "number")])
def test_config_json_with_a_field_of_the_wrong_type(tmp_path, field, value, kind):
    config = {"_class_name": "AutoencoderKL", **KL_BASE, "scaling_factor": 0.18215, field: value}
    folder = _folder(tmp_path, json.dumps(config))
    with pytest.raises(VAEError, match=rf"field '{field}' is .* it must be a {kind}") as e:
        load_vae(folder)
    assert str(folder / "config.json") in str(e.value)
