"""create_model: OpenAI's options and defaults, the released checkpoints' state-dict layout, and the
base / super-resolution / inpainting models end to end on tiny configs."""

import pytest
import torch

from diffkern.models.glide import (create_model, model_and_diffusion_defaults,
                                   model_and_diffusion_defaults_upsampler)
from tests.models._helpers import BACKENDS, backend_context, check_backends, max_diff, randomise

# Published totals of the released checkpoints' models, as printed by OpenAI's text2im notebook
# (sum of parameter numel), quoted by two independent projects: base 385,030,726; upsampler 398,361,286.
BASE_PARAMS, UPSAMPLER_PARAMS = 385_030_726, 398_361_286


def expected_shapes(o):
    """{key: shape} of OpenAI's Text2ImUNet for options `o`, from the rules of its construction:
    conv in, per level num_res_blocks ResBlocks (+ attention at the listed resolutions) and a
    down ResBlock between levels; middle ResBlock-attention-ResBlock; per level, reversed,
    num_res_blocks + 1 ResBlocks on [h, skip] (+ attention), an up ResBlock after the last one
    (except at level 0); norm + conv out; the text transformer and its embeddings."""
    mc, width, size = o["num_channels"], o["xf_width"], o["image_size"]
    emb = 4 * mc
    mult = {64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}[size] if o["channel_mult"] == "" else \
        tuple(int(m) for m in o["channel_mult"].split(","))
    attn_px = {int(r) for r in o["attention_resolutions"].split(",")}
    image_in = 3 * (1 + o["super_res"] + o["inpaint"]) + o["inpaint"]
    s = {}

    def vec(p, n):
        s[p + ".weight"], s[p + ".bias"] = (n,), (n,)

    def conv(p, cout, cin, k):
        s[p + ".weight"], s[p + ".bias"] = (cout, cin) + (k,) * (2 if k == 3 else 1), (cout,)

    def lin(p, cout, cin):
        s[p + ".weight"], s[p + ".bias"] = (cout, cin), (cout,)

    def res(p, cin, cout):
        vec(p + ".in_layers.0", cin)
        s[p + ".in_layers.2.weight"], s[p + ".in_layers.2.bias"] = (cout, cin, 3, 3), (cout,)
        lin(p + ".emb_layers.1", 2 * cout, emb)  # use_scale_shift_norm: scale and shift
        vec(p + ".out_layers.0", cout)
        s[p + ".out_layers.3.weight"], s[p + ".out_layers.3.bias"] = (cout, cout, 3, 3), (cout,)
        if cin != cout:
            s[p + ".skip_connection.weight"], s[p + ".skip_connection.bias"] = (cout, cin, 1, 1), (cout,)

    def attn(p, c):
        vec(p + ".norm", c)
        conv(p + ".qkv", 3 * c, c, 1)
        conv(p + ".encoder_kv", 2 * c, width, 1)
        conv(p + ".proj_out", c, c, 1)

    lin("time_embed.0", emb, mc)
    lin("time_embed.2", emb, emb)
    s["input_blocks.0.0.weight"], s["input_blocks.0.0.bias"] = (mult[0] * mc, image_in, 3, 3), (mult[0] * mc,)
    i, px, ch, skips = 1, size, mult[0] * mc, [mult[0] * mc]
    for level, m in enumerate(mult):
        for _ in range(o["num_res_blocks"]):
            res(f"input_blocks.{i}.0", ch, m * mc)
            ch = m * mc
            if px in attn_px:
                attn(f"input_blocks.{i}.1", ch)
            skips.append(ch)
            i += 1
        if level < len(mult) - 1:
            res(f"input_blocks.{i}.0", ch, ch)
            skips.append(ch)
            i, px = i + 1, px // 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    j = 0
    for level in reversed(range(len(mult))):
        for r in range(o["num_res_blocks"] + 1):
            res(f"output_blocks.{j}.0", ch + skips.pop(), mult[level] * mc)
            ch, n = mult[level] * mc, 1
            if px in attn_px:
                attn(f"output_blocks.{j}.1", ch)
                n = 2
            if level and r == o["num_res_blocks"]:
                res(f"output_blocks.{j}.{n}", ch, ch)
                px *= 2
            j += 1
    vec("out.0", ch)
    s["out.2.weight"], s["out.2.bias"] = (6, mult[0] * mc, 3, 3), (6,)
    for layer in range(o["xf_layers"]):
        p = f"transformer.resblocks.{layer}"
        vec(p + ".ln_1", width)
        lin(p + ".attn.c_qkv", 3 * width, width)
        lin(p + ".attn.c_proj", width, width)
        vec(p + ".ln_2", width)
        lin(p + ".mlp.c_fc", 4 * width, width)
        lin(p + ".mlp.c_proj", width, 4 * width)
    vec("final_ln", width)
    s["token_embedding.weight"] = (50257, width)
    s["positional_embedding"] = s["padding_embedding"] = (o["text_ctx"], width)
    lin("transformer_proj", emb, width)
    return s


def _meta_model(options):
    with torch.device("meta"):
        return create_model(**options)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,defaults,inpaint,in_channels,n_blocks", [
    ("base.pt", model_and_diffusion_defaults, False, 3, 16),
    ("base_inpaint.pt", model_and_diffusion_defaults, True, 7, 16),
    ("upsample.pt", model_and_diffusion_defaults_upsampler, False, 6, 18),
    ("upsample_inpaint.pt", model_and_diffusion_defaults_upsampler, True, 10, 18),
])
def test_released_state_dict_layout(name, defaults, inpaint, in_channels, n_blocks):
    options = {**defaults(), "inpaint": inpaint}
    model = _meta_model(options)
    shapes = _shapes(model)
    assert shapes == expected_shapes(options)
    # A few keys spelled out, as in OpenAI's checkpoints (192 channels, 64 per head, xf_width 512).
    assert len(model.input_blocks) == len(model.output_blocks) == n_blocks  # 1 + levels * blocks + levels - 1
    assert shapes["input_blocks.0.0.weight"] == (192, in_channels, 3, 3)
    assert shapes["input_blocks.1.0.in_layers.0.weight"] == (192,)
    assert shapes["input_blocks.1.0.emb_layers.1.weight"] == (2 * 192, 768)
    assert shapes["transformer.resblocks.15.attn.c_qkv.weight"] == (1536, 512)
    assert shapes["padding_embedding"] == (128, 512)
    assert shapes["out.2.weight"] == (6, 192, 3, 3)
    if name.startswith("base"):
        assert shapes["input_blocks.5.1.qkv.weight"] == (3 * 384, 384, 1)  # first attention: 32 px
        assert shapes["input_blocks.5.1.encoder_kv.weight"] == (2 * 384, 512, 1)
        assert shapes["input_blocks.4.0.in_layers.2.weight"] == (192, 192, 3, 3)  # the down ResBlock


@pytest.mark.parametrize("defaults,published", [(model_and_diffusion_defaults, BASE_PARAMS),
                                                (model_and_diffusion_defaults_upsampler, UPSAMPLER_PARAMS)])
def test_released_parameter_counts(defaults, published):
    model = _meta_model(defaults())
    assert sum(p.numel() for p in model.parameters()) == published


def test_defaults_are_openais():
    base = model_and_diffusion_defaults()
    assert base == dict(
        image_size=64, num_channels=192, num_res_blocks=3, channel_mult="", num_heads=1, num_head_channels=64,
        num_heads_upsample=-1, attention_resolutions="32,16,8", dropout=0.1, text_ctx=128, xf_width=512,
        xf_layers=16, xf_heads=8, xf_final_ln=True, xf_padding=True, diffusion_steps=1000,
        noise_schedule="squaredcos_cap_v2", timestep_respacing="", use_scale_shift_norm=True,
        resblock_updown=True, use_fp16=True, cache_text_emb=False, inpaint=False, super_res=False)
    assert model_and_diffusion_defaults_upsampler() == {
        **base, "image_size": 256, "num_res_blocks": 2, "noise_schedule": "linear", "super_res": True}


def test_use_fp16_converts_the_torso_as_openai():
    """Convs of the torso and the transformer's Linears, transformer_proj and token_embedding go to
    float16; norms, emb_layers, time_embed, out and the positional / padding embeddings stay float32."""
    model = _meta_model({**_TINY, "use_fp16": True})
    half = {k for k, v in model.state_dict().items() if v.dtype == torch.float16}
    assert "input_blocks.0.0.weight" in half and "input_blocks.1.1.qkv.weight" in half
    assert "input_blocks.1.1.encoder_kv.bias" in half and "transformer.resblocks.0.attn.c_qkv.weight" in half
    assert "transformer_proj.weight" in half and "token_embedding.weight" in half
    for key in ("input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
                "time_embed.0.weight", "out.2.weight", "out.0.weight", "transformer.resblocks.0.ln_1.weight",
                "final_ln.weight", "positional_embedding", "padding_embedding"):
        assert key not in half, key
    assert model.dtype == torch.float16


_TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="16,8", num_head_channels=16, dropout=0.0, text_ctx=5, xf_width=32,
             xf_layers=1, xf_heads=2, use_fp16=False)


@pytest.mark.parametrize("variant", ["base", "super_res", "inpaint", "super_res+inpaint"])
def test_tiny_models_run_alike_on_every_backend(variant, used_backends):
    torch.manual_seed(0)
    options = {**_TINY, "super_res": "super_res" in variant, "inpaint": "inpaint" in variant}
    model = randomise(create_model(**options))
    B = 2
    mask = torch.tensor([[1, 1, 0, 0, 0], [1] * 5]).bool()
    kwargs = dict(tokens=torch.randint(0, 50257, (B, 5)), mask=mask)
    if options["super_res"]:
        kwargs["low_res"] = torch.randn(B, 3, 8, 8)
    if options["inpaint"]:
        kwargs["inpaint_image"] = torch.randn(B, 3, 16, 16)
        kwargs["inpaint_mask"] = (torch.rand(B, 1, 16, 16) > 0.5).float()
    x, t = torch.randn(B, 3, 16, 16), torch.tensor([10, 900])
    outs = {}
    for backend in BACKENDS:
        used_backends["group_norm"].clear()
        used_backends["attention"].clear()
        with backend_context(backend), torch.no_grad():
            outs[backend] = model(x, t, **kwargs)
        check_backends(used_backends, backend)
        assert outs[backend].shape == (B, 6, 16, 16)
        assert torch.isfinite(outs[backend]).all()
    assert max_diff(outs["reference"], outs["default"]) < 1e-4


def test_channel_mult_default_and_explicit():
    model = _meta_model({**model_and_diffusion_defaults_upsampler(), "xf_layers": 1})
    assert model.channel_mult == (1, 1, 2, 2, 4, 4)
    assert model.attention_resolutions == (8, 16, 32)


@pytest.mark.parametrize("options,match", [
    ({"num_chanels": 64}, "num_chanels"),
    ({"learn_sigma": True, "class_cond": False}, "class_cond, learn_sigma"),
    ({"channel_mult": "1,2,3"}, "channel_mult"),
    ({"channel_mult": "1,x"}, "channel_mult"),
    ({"image_size": 48}, "image_size"),
    ({"attention_resolutions": "32;16"}, "attention_resolutions"),
])
def test_create_model_errors_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        _meta_model({**_TINY, "channel_mult": "", "image_size": 64, **options})


def test_low_res_errors_name_the_argument():
    model = create_model(**{**_TINY, "super_res": True})
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([1])
    text = dict(tokens=torch.zeros(1, 5, dtype=torch.long), mask=torch.ones(1, 5, dtype=torch.bool))
    for low_res in (None, torch.randn(1, 4, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(3, 8, 8)):
        with pytest.raises(ValueError, match="low_res"):
            model(x, t, low_res=low_res, **text)
    with pytest.raises(ValueError, match="low_res"):
        create_model(**_TINY)(x, t, low_res=torch.randn(1, 3, 8, 8), **text)
    with pytest.raises(ValueError, match="inpaint_mask"):
        create_model(**{**_TINY, "inpaint": True})(x, t, inpaint_mask=torch.ones(1, 3, 16, 16), **text)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, 6, 16, 16), t, low_res=torch.randn(1, 3, 8, 8), **text)


def test_fp16_model_matches_fp32_within_half_precision():
    """The converted model (float16 activations through the torso) loads the float32 state dict and
    stays within float16 rounding of the float32 model: 1e-2 of the output's scale covers the
    ~2^-11 relative rounding accumulated over the ~20 layers of the tiny model."""
    torch.manual_seed(0)
    model = randomise(create_model(**_TINY))
    half = create_model(**{**_TINY, "use_fp16": True})
    half.load_state_dict(model.state_dict())
    half.eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 600])
    text = dict(tokens=torch.randint(0, 50257, (2, 5)), mask=torch.ones(2, 5, dtype=torch.bool))
    with torch.no_grad():
        want, got = model(x, t, **text), half(x, t, **text)
    assert got.dtype == torch.float32  # the out head runs in x's dtype, as OpenAI's
    assert max_diff(got, want) < 1e-2 * want.abs().max().item()
