"""diffkern.models.loading.load on every format, from tiny random-weight models written to tmp_path.

Outputs are compared with the diffusers / transformers models the files were made from.
"""

import json
import pickle
import string
import sys
import types

import pytest
import torch

import diffkern.models as dm
from diffkern.models import compvis
from diffkern.models.loading import CheckpointError, LoadedPipeline, load
from tests.models.test_compvis import openclip_layout, text_model_keys, tiny_clip, tiny_unet, tiny_vae

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def unet_out(unet, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=gen)
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=gen)
    p = next(unet.parameters())
    with torch.no_grad():
        out = unet(x.to(p.dtype), torch.tensor([10, 500]), ctx.to(p.dtype))
    return getattr(out, "sample", out).float()


def vae_out(vae):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior = vae.encode(x)
        out = vae.decode(getattr(posterior, "latent_dist", posterior).mode())  # diffusers wraps both
    return getattr(out, "sample", out).float()


def clip_out(model):
    ids = torch.tensor([[0, 5, 9, 2, 1, 1]])
    with torch.no_grad():
        return model(ids)[0].float()


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() < tol


def sd_scheduler():
    return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def write_tokenizer(folder):
    """A minimal CLIP BPE tokenizer: single letters (+ word-final forms), no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def compvis_unet(unet):
    """model.diffusion_model.* keys of a diffusers UNet, as a CompVis checkpoint stores them."""
    cv = compvis.unet_to_compvis(unet.state_dict(), dict(unet.config))
    return {compvis.UNET_PREFIX + k: v for k, v in cv.items()}


def sd_compvis_checkpoint(unet, vae, text, openclip=False):
    """A CompVis-layout state dict made from tiny diffusers / transformers models."""
    sd = compvis_unet(unet)
    sd.update({compvis.VAE_PREFIX + k: v for k, v in compvis.vae_to_compvis(vae.state_dict()).items()})
    if openclip:
        sd.update({compvis.OPENCLIP_PREFIX + k: v for k, v in openclip_layout(text.state_dict()).items()})
    else:
        sd.update({compvis.CLIP_PREFIX + k: v for k, v in text_model_keys(text.state_dict()).items()})
        sd[compvis.CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(16)[None]
    sd["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return sd


# --- component folders -------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["safetensors", "bin", "fp16_variant"])
def test_component_folder(tmp_path, how):
    unet = tiny_unet()
    if how == "fp16_variant":
        unet.half().save_pretrained(tmp_path, variant="fp16")
        unet.float()
    else:
        unet.save_pretrained(tmp_path, safe_serialization=how == "safetensors")
    kwargs = {"variant": "fp16"} if how == "fp16_variant" else {}
    ours = load(tmp_path, **kwargs)
    assert isinstance(ours, dm.UNet2DConditionModel)
    assert next(ours.parameters()).dtype == (torch.float16 if how == "fp16_variant" else torch.float32)
    if how == "fp16_variant":  # same fp16-rounded weights on both sides, computed in fp32
        ours = load(tmp_path, variant="fp16", dtype=torch.float32)
    assert close(unet_out(ours), unet_out(unet), 1e-4 if how != "fp16_variant" else 2e-2)


def test_component_folder_dtype_and_missing_variant(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path)
    half = load(tmp_path, dtype=torch.float16)
    assert isinstance(half, dm.AutoencoderKL)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert close(vae_out(load(tmp_path)), vae_out(vae))
    with pytest.raises(FileNotFoundError, match="fp16"):
        load(tmp_path, variant="fp16")


# --- pipeline folders --------------------------------------------------------------------------

def test_pipeline_folder(tmp_path):
    from transformers import CLIPTokenizer

    unet, vae, clip = tiny_unet(), tiny_vae(), tiny_clip()
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path / "tok"), model_max_length=16)
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=clip, tokenizer=tokenizer, scheduler=sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load(tmp_path / "pipe")
    assert isinstance(loaded, LoadedPipeline)
    assert close(unet_out(loaded.unet), unet_out(unet)) and close(vae_out(loaded.vae), vae_out(vae))
    assert close(clip_out(loaded.text_encoder), clip_out(clip))
    assert loaded.tokenizer("a cat").input_ids == tokenizer("a cat").input_ids
    assert loaded.model_index["_class_name"] == "StableDiffusionPipeline"
    from diffkern.schedulers import DDIMScheduler

    assert DDIMScheduler.from_config(loaded.scheduler_config).config["num_train_timesteps"] == 1000
    assert loaded.prediction_type == "epsilon"
    v_pipe = load(tmp_path / "pipe", prediction_type="v_prediction")
    assert v_pipe.scheduler_config["prediction_type"] == v_pipe.prediction_type == "v_prediction"
    only = load(tmp_path / "pipe", component="vae", dtype=torch.float16)
    assert isinstance(only, dm.AutoencoderKL) and next(only.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="component"):
        load(tmp_path / "pipe", component="prior")


def test_pipeline_folder_fp16_variant(tmp_path):
    pipe = diffusers.StableDiffusionPipeline(
        unet=tiny_unet(), vae=tiny_vae(), text_encoder=tiny_clip(), tokenizer=None, scheduler=sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    loaded = load(tmp_path, variant="fp16")
    for module in (loaded.unet, loaded.vae, loaded.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float16}
    assert loaded.tokenizer is None
    with pytest.raises(FileNotFoundError, match="bf16"):
        load(tmp_path, variant="bf16")


def test_ldm_text2im_pipeline_folder(tmp_path):
    from tests.pipelines import bert_tokenizer, tiny_ldmbert

    bert, vae = tiny_ldmbert(), tiny_vae()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    pipe = diffusers.LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=bert_tokenizer(tmp_path / "tok"),
                                            unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.save_pretrained(tmp_path / "ldm")
    loaded = load(tmp_path / "ldm")
    assert loaded.text_encoder is loaded.components["bert"] and loaded.vae is loaded.components["vqvae"]
    assert type(loaded.text_encoder).__name__ == "LDMBertModel"
    assert type(loaded.tokenizer).__name__ == "BertTokenizer"
    ids = torch.randint(5, 64, (1, 77))
    with torch.no_grad():
        assert close(loaded.text_encoder(ids)[0], bert(ids)[0])
    assert close(unet_out(loaded.unet), unet_out(unet))


def test_bf16_weights_keep_or_convert(tmp_path):
    vae = tiny_vae().to(torch.bfloat16)
    vae.save_pretrained(tmp_path)
    assert {p.dtype for p in load(tmp_path).parameters()} == {torch.bfloat16}
    as_fp32 = load(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert close(vae_out(as_fp32), vae_out(vae.float()))


# --- CompVis single files ----------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_sd1_single_file(tmp_path, suffix):
    unet, vae, clip = tiny_unet(), tiny_vae(), tiny_clip()
    sd = sd_compvis_checkpoint(unet, vae, clip)
    path = tmp_path / f"model{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 10}, path)
    else:
        safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load(path, tokenizer=write_tokenizer(tmp_path / "tok"))
    assert close(unet_out(loaded.unet), unet_out(unet)) and close(vae_out(loaded.vae), vae_out(vae))
    assert close(clip_out(loaded.text_encoder), clip_out(clip))
    assert loaded.tokenizer is not None and loaded.prediction_type == "epsilon"
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"
    assert "trained_betas" not in loaded.scheduler_config
    assert loaded.model_index["family"] == "1.x"


def test_sd2_single_file_openclip(tmp_path):
    unet, vae = tiny_unet(linear=True), tiny_vae()
    clip = tiny_clip(layers=2, act="gelu")  # what the penultimate-layer encoder must equal
    path = tmp_path / "v2.safetensors"
    sd = sd_compvis_checkpoint(unet, vae, clip, openclip=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load(path, prediction_type="v_prediction")
    assert loaded.model_index["family"] == "2.x" and loaded.tokenizer is None
    assert loaded.unet.config["attention_head_dim"] == [1, 2] and loaded.unet.config["use_linear_projection"]
    assert close(unet_out(loaded.unet), unet_out(unet))
    assert close(clip_out(loaded.text_encoder), clip_out(clip))
    assert loaded.text_encoder.config.hidden_act == "gelu"
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert any("tokenizer" in note for note in loaded.notes)
    half = load(path, component="unet", dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_lightning_callback_state_loads(tmp_path, monkeypatch):
    # Lightning checkpoints pickle the callback class as a dict key; weights_only refuses it unless
    # stood in for. Make a module of that name so pickle can write the reference.
    names = ["pytorch_lightning", "pytorch_lightning.callbacks",
             "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = sys.modules[names[-1]]

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    unet = tiny_unet()
    sd = compvis_unet(unet)
    callbacks = {ModelCheckpoint: {"best_model_path": "x"}}
    torch.save({"state_dict": sd, "callbacks": callbacks}, tmp_path / "pl.ckpt")
    for name in names:  # loading must not need the module
        monkeypatch.delitem(sys.modules, name)
    assert close(unet_out(load(tmp_path / "pl.ckpt", component="unet")), unet_out(unet))


# --- errors ------------------------------------------------------------------------------------

class _Payload:
    def __reduce__(self):
        return (print, ("unsafe pickle code ran",))


@pytest.mark.parametrize("kind", ["random.ckpt", "random.safetensors", "truncated.safetensors",
                                  "truncated.ckpt", "empty.ckpt", "code.ckpt", "not_a_dict.pt"])
def test_bad_files_raise_checkpoint_error_naming_them(tmp_path, kind, capsys):
    path = tmp_path / kind
    good = {"model.diffusion_model.out.2.weight": torch.randn(4, 32, 3, 3)}
    if kind.startswith("random"):
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "truncated.safetensors":
        safetensors_torch.save_file(good, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "truncated.ckpt":
        torch.save({"state_dict": good}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "empty.ckpt":
        path.write_bytes(b"")
    elif kind == "code.ckpt":
        with open(path, "wb") as f:
            pickle.dump({"state_dict": good, "x": _Payload()}, f, protocol=2)
    else:
        torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=kind.replace(".", r"\.")) as info:
        load(path)
    assert "unsafe pickle code ran" not in capsys.readouterr().out
    if kind == "code.ckpt":
        assert "weights_only" in str(info.value)


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no_such_model.ckpt"):
        load("/nonexistent/no_such_model.ckpt")


def test_key_problems_listed_in_one_error(tmp_path):
    unet = tiny_unet()
    sd = compvis_unet(unet)
    del sd[compvis.UNET_PREFIX + "time_embed.2.bias"]
    sd[compvis.UNET_PREFIX + "input_blocks.1.0.extra.weight"] = torch.zeros(3)
    sd[compvis.UNET_PREFIX + "out.0.bias"] = torch.zeros(7)
    sd["mystery.tensor"] = torch.zeros(1)
    safetensors_torch.save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load(tmp_path / "bad.safetensors", component="unet")
    message = str(info.value)
    assert "bad.safetensors" in message
    missing = "1 missing: time_embedding.linear_2.bias (file: model.diffusion_model.time_embed.2.bias)"
    assert missing in message
    assert "1 unexpected: input_blocks.1.0.extra.weight" in message
    assert "conv_norm_out.bias" in message and "file (7,) vs model (32,)" in message
    assert "mystery.tensor" in message


def test_component_folder_key_problems(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path)
    sd = safetensors_torch.load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    sd.pop("quant_conv.bias")
    sd["decoder.conv_in.weight"] = torch.zeros(1)
    safetensors_torch.save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)1 missing: quant_conv.bias.*decoder.conv_in.weight"):
        load(tmp_path)


def test_argument_and_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither model_index.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load(tmp_path, dtype="float16")
    with pytest.raises(ValueError, match="prediction_type"):
        load(tmp_path, prediction_type="eps")
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="variant"):
        load(tmp_path / "x.ckpt", variant="fp16")


# ------------------------------------------------------------------------------------------------
# Hostile files: every one a CheckpointError naming the file (never AttributeError / KeyError / ...)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_pipe(tmp_path_factory):
    """A small SD pipeline folder (diffusers' save_pretrained) to break one file at a time."""
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("hostile")
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(root / "tok"), model_max_length=16)
    pipe = diffusers.StableDiffusionPipeline(
        unet=tiny_unet(), vae=tiny_vae(), text_encoder=tiny_clip(), tokenizer=tokenizer, scheduler=sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def _copy(good, tmp_path):
    import shutil

    return shutil.copytree(good, tmp_path / "pipe")


def _json(path, value):
    path.write_text(json.dumps(value))


def _shard(folder):
    """Rewrite the UNet's weights as two shards + index (diffusers' layout); returns (index path, weight_map)."""
    from safetensors.torch import load_file, save_file

    single = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(single))
    names = sorted(sd)
    half = len(names) // 2
    parts = {"a-00001.safetensors": names[:half], "a-00002.safetensors": names[half:]}
    for shard, keys in parts.items():
        save_file({k: sd[k].contiguous() for k in keys}, str(folder / shard))
    single.unlink()
    weight_map = {k: shard for shard, keys in parts.items() for k in keys}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    _json(index, {"metadata": {}, "weight_map": weight_map})
    return index, weight_map


def _break(case, pipe):
    """Break one file of the pipeline folder `pipe`; returns (path to load, text the error must contain)."""
    unet = pipe / "unet"
    if case == "config-list":
        _json(unet / "config.json", [1, 2])
        return unet, "config.json: expected a JSON object"
    if case == "config-not-json":
        (unet / "config.json").write_bytes(b"\xff\xfe{not json")
        return unet, "config.json: cannot read the JSON file"
    if case == "config-zero-heads":
        cfg = json.loads((unet / "config.json").read_text())
        _json(unet / "config.json", dict(cfg, attention_head_dim=0, block_out_channels="abc"))
        return unet, "its config is not supported"
    if case == "class-name-number":
        cfg = json.loads((unet / "config.json").read_text())
        _json(unet / "config.json", dict(cfg, _class_name=7))
        return unet, '"_class_name" must be a string'
    if case == "model-index-list":
        _json(pipe / "model_index.json", ["unet"])
        return pipe, "model_index.json: expected a JSON object"
    if case == "model-index-escape":
        index = json.loads((pipe / "model_index.json").read_text())
        _json(pipe / "model_index.json", dict(index, **{"../unet": ["diffusers", "UNet2DConditionModel"]}))
        return pipe, "'../unet' is not a plain name"
    if case == "model-index-class":
        index = json.loads((pipe / "model_index.json").read_text())
        _json(pipe / "model_index.json", dict(index, unet=["diffusers", 42]))
        return pipe, "names its class 42"
    if case == "scheduler-list":
        _json(pipe / "scheduler" / "scheduler_config.json", [])
        return pipe, "scheduler_config.json: expected a JSON object"
    index, weight_map = _shard(unet)
    if case == "shard-no-map":
        _json(index, {"metadata": {}})
        return unet, 'expected a non-empty "weight_map"'
    if case == "shard-map-list":
        _json(index, {"weight_map": list(weight_map)})
        return unet, 'expected a non-empty "weight_map"'
    if case == "shard-missing":
        (unet / "a-00002.safetensors").unlink()
        return unet, "names the shard a-00002.safetensors, which is not in"
    if case == "shard-escape":
        _json(index, {"weight_map": dict(weight_map, x="../../etc/passwd")})
        return unet, "'../../etc/passwd' is not a plain name"
    if case == "shard-promises-more":
        _json(index, {"weight_map": dict(weight_map, **{"extra.weight": "a-00001.safetensors"})})
        return unet, "1 tensors it maps are in none of the shards: extra.weight"
    if case == "shard-not-tensors":
        (unet / "a-00001.safetensors").write_bytes(b"\x00" * 64)
        return unet, "a-00001.safetensors: cannot read the checkpoint"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["config-list", "config-not-json", "config-zero-heads", "class-name-number",
                                  "model-index-list", "model-index-escape", "model-index-class", "scheduler-list",
                                  "shard-no-map", "shard-map-list", "shard-missing", "shard-escape",
                                  "shard-promises-more", "shard-not-tensors"])
def test_hostile_folders_raise_checkpoint_error_naming_the_file(good_pipe, tmp_path, case):
    path, expected = _break(case, _copy(good_pipe, tmp_path))
    with pytest.raises(CheckpointError) as err:
        load(path)
    assert expected in str(err.value) and str(path) in str(err.value), str(err.value)


def test_hostile_text_encoder_and_tokenizer_files(good_pipe, tmp_path):
    pipe = _copy(good_pipe, tmp_path)
    te = pipe / "text_encoder"
    for weights in te.glob("model*.safetensors"):
        weights.unlink()
    (te / "pytorch_model.bin").write_bytes(b"\x80\x02garbage that is no pickle")
    with pytest.raises(CheckpointError, match="text_encoder") as err:
        load(pipe)
    assert "cannot" in str(err.value)
    _json(te / "config.json", {"architectures": "CLIPTextModel", "model_type": "clip_text_model"})
    with pytest.raises(CheckpointError, match='"architectures" must be a list'):
        load(te)
    _json(te / "config.json", ["not", "a", "config"])
    with pytest.raises(CheckpointError, match="text_encoder/config.json: expected a JSON object"):
        load(te)
    _json(pipe / "tokenizer" / "tokenizer_config.json", [1])
    from diffkern.models.text_encoders import load_tokenizer

    with pytest.raises(CheckpointError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(str(pipe / "tokenizer"))
    (pipe / "tokenizer" / "tokenizer_config.json").unlink()
    for name in ("vocab.json", "tokenizer.json"):
        (pipe / "tokenizer" / name).write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(str(pipe / "tokenizer"))


def test_hostile_t5_unclip_if_and_glide_files(tmp_path):
    """The other folder loaders: T5 (IF), Karlo's diffusers folders, IF's folder detection, GLIDE's tokenizer."""
    import gzip

    from diffkern.models.glide.tokenizer import GlideTokenizer
    from diffkern.models.t5 import load_t5, load_t5_tokenizer
    from diffkern.models.unclip.folders import load_unclip_folder, unclip_pipeline_class
    from diffkern.pipelines.imagen import if_folder_pipeline

    t5 = tmp_path / "t5"
    t5.mkdir()
    _json(t5 / "config.json", {"model_type": "t5", "architectures": ["T5EncoderModel"], "d_model": 8, "d_ff": 16,
                               "d_kv": 4, "num_heads": 2, "num_layers": 1, "vocab_size": 32})
    (t5 / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken header}")
    with pytest.raises(CheckpointError, match="t5"):
        load_t5(str(t5))
    (t5 / "tokenizer.json").write_text("{\"not\": \"a tokenizer\"}")
    with pytest.raises(CheckpointError, match="T5 tokenizer"):
        load_t5_tokenizer(str(t5))

    karlo = tmp_path / "karlo"
    karlo.mkdir()
    _json(karlo / "model_index.json", ["UnCLIPPipeline"])
    with pytest.raises(CheckpointError, match="model_index.json: expected a JSON object"):
        unclip_pipeline_class(karlo)
    with pytest.raises(CheckpointError, match="model_index.json: expected a JSON object"):
        if_folder_pipeline(karlo)
    _json(karlo / "model_index.json", {"_class_name": "UnCLIPPipeline", "../prior": ["diffusers", "PriorTransformer"]})
    with pytest.raises(CheckpointError, match="not a plain name"):
        load_unclip_folder(karlo)
    _json(karlo / "model_index.json", {"_class_name": "UnCLIPPipeline", "prior_scheduler": ["diffusers",
                                                                                             "UnCLIPScheduler"]})
    (karlo / "prior_scheduler").mkdir()
    _json(karlo / "prior_scheduler" / "scheduler_config.json", [0])
    with pytest.raises(CheckpointError, match="scheduler_config.json: expected a JSON object"):
        load_unclip_folder(karlo)

    glide = tmp_path / "glide_tok"
    glide.mkdir()
    (glide / "encoder.json.gz").write_bytes(b"not gzip at all")
    (glide / "vocab.bpe.gz").write_bytes(gzip.compress(b"#version: 0.2\n"))
    with pytest.raises(CheckpointError, match="encoder.json.gz: cannot read"):
        GlideTokenizer.from_path(glide)
    (glide / "encoder.json.gz").write_bytes(gzip.compress(b"[1, 2]"))
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        GlideTokenizer.from_path(glide)
