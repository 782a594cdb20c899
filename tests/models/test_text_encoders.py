"""Text encoders against diffusers / transformers: LDMBertModel equals diffusers' LDMBertModel, and
encode_prompt gives the embeddings diffusers' StableDiffusionPipeline computes."""

import pytest
import torch

from diffkern.models.text_encoders import (
    LDMBertModel,
    encode_prompt,
    load_text_encoder,
    load_tokenizer,
)
from tests.pipelines import (
    SD_SCHEDULER_CONFIG,
    bert_tokenizer,
    clip_tokenizer,
    tiny_clip,
    tiny_ldmbert,
    tiny_unet,
    tiny_vae,
)

pytest.importorskip("diffusers")

PROMPTS = ["a photo of a cat", "a red dog on the moon"]


@pytest.fixture(scope="module")
def ldmbert():
    return tiny_ldmbert()


def test_ldmbert_state_dict_keys_equal_diffusers(ldmbert):
    ours = LDMBertModel(vocab_size=64, encoder_layers=2, encoder_ffn_dim=37, encoder_attention_heads=4,
                        head_dim=8, d_model=32)
    theirs = ldmbert.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    ours.load_state_dict(theirs, strict=True)


@pytest.mark.parametrize("with_mask", [False, True])
def test_ldmbert_matches_diffusers(ldmbert, with_mask):
    ours = LDMBertModel.from_diffusers(ldmbert)
    ids = torch.randint(5, 64, (2, 77))
    mask = None
    if with_mask:
        mask = torch.ones(2, 77, dtype=torch.long)
        mask[1, 40:] = 0  # padded second row
    with torch.no_grad():
        ref = ldmbert(ids, attention_mask=mask, output_hidden_states=True)
        out = ours(ids, attention_mask=mask, output_hidden_states=True)
    assert (out[0] - ref[0]).abs().max().item() < 1e-4
    assert len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert (a - b).abs().max().item() < 1e-4


def test_ldmbert_from_pretrained_folder(ldmbert, tmp_path):
    ldmbert.save_pretrained(tmp_path / "bert")
    ours = load_text_encoder(str(tmp_path / "bert"))
    assert isinstance(ours, LDMBertModel) and ours.to_logits is None  # the unused head is skipped
    ids = torch.randint(5, 64, (1, 77))
    with torch.no_grad():
        assert (ours(ids)[0] - ldmbert(ids)[0]).abs().max().item() < 1e-4


def test_ldmbert_config_errors():
    with pytest.raises(ValueError, match="bogus_option"):
        LDMBertModel(bogus_option=1)
    with pytest.raises(ValueError, match="activation_function"):
        LDMBertModel(activation_function="mish", encoder_layers=1, d_model=8, head_dim=2, encoder_ffn_dim=8)
    m = LDMBertModel(vocab_size=16, encoder_layers=1, d_model=8, head_dim=2, encoder_ffn_dim=8,
                     max_position_embeddings=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.zeros(1, 5, dtype=torch.long))


@pytest.fixture(scope="module")
def clip_parts(tmp_path_factory):
    return tiny_clip(), clip_tokenizer(tmp_path_factory.mktemp("clip_tok"))


def _ids(tokenizer):
    """Token ids as diffusers' pipelines tokenize (77 positions, padded, truncated)."""
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return tokens.input_ids


def _diffusers_sd(text_encoder, tokenizer):
    import diffusers

    return diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(),
        scheduler=diffusers.DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def test_encode_prompt_matches_diffusers(clip_parts):
    text_encoder, tokenizer = clip_parts
    pipe = _diffusers_sd(text_encoder, tokenizer)
    ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    out = encode_prompt(text_encoder, tokenizer, PROMPTS)
    assert out.shape == (2, 77, 32)
    assert torch.equal(out, ref)


def test_encode_prompt_clip_skip(clip_parts):
    # diffusers' formula: hidden_states[-(clip_skip + 1)] through the final LayerNorm. Its own path
    # (text_encoder.text_model.final_layer_norm) cannot run with transformers >= 5, which moved
    # final_layer_norm onto CLIPTextModel, so the reference is computed here.
    text_encoder, tokenizer = clip_parts
    ids = _ids(tokenizer)
    with torch.no_grad():
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states
        ref = text_encoder.final_layer_norm(hidden[-2])
    out = encode_prompt(text_encoder, tokenizer, PROMPTS, clip_skip=1)
    assert torch.equal(out, ref)
    assert not torch.equal(out, encode_prompt(text_encoder, tokenizer, PROMPTS))
    assert torch.equal(encode_prompt(text_encoder, tokenizer, PROMPTS, clip_skip=0),
                       encode_prompt(text_encoder, tokenizer, PROMPTS))


def test_encode_prompt_ldmbert_matches_diffusers_tokenization(ldmbert, tmp_path):
    tokenizer = bert_tokenizer(tmp_path)
    ids = _ids(tokenizer)
    with torch.no_grad():
        ref = ldmbert(ids)[0]
    out = encode_prompt(LDMBertModel.from_diffusers(ldmbert), tokenizer, PROMPTS)  # 77 from the config
    assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-4


def test_encode_prompt_truncation_warns(clip_parts, caplog):
    text_encoder, tokenizer = clip_parts
    with caplog.at_level("WARNING", logger="diffkern.models.text_encoders"):
        out = encode_prompt(text_encoder, tokenizer, " ".join(["cat"] * 100))
    assert out.shape == (1, 77, 32) and "truncated" in caplog.text


def test_encode_prompt_errors(clip_parts):
    text_encoder, tokenizer = clip_parts
    with pytest.raises(TypeError, match="prompts"):
        encode_prompt(text_encoder, tokenizer, 3)
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompt(text_encoder, tokenizer, "a cat", clip_skip=-1)
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompt(text_encoder, tokenizer, "a cat", clip_skip=3)  # 3 layers: at most 2 can be skipped


def test_load_clip_and_tokenizers(clip_parts, tmp_path):
    text_encoder, tokenizer = clip_parts
    text_encoder.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = load_text_encoder(str(tmp_path / "text_encoder"))
    tok = load_tokenizer(str(tmp_path / "tokenizer"))
    assert type(loaded).__name__ == "CLIPTextModel" and not loaded.training
    assert type(tok).__name__ == "CLIPTokenizer"
    assert torch.equal(encode_prompt(loaded, tok, PROMPTS), encode_prompt(text_encoder, tokenizer, PROMPTS))
    bert_tokenizer(tmp_path / "bert_tok")
    assert type(load_tokenizer(str(tmp_path / "bert_tok"))).__name__ == "BertTokenizer"
