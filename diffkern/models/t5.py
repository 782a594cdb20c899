"""The T5 text encoder of Imagen / DeepFloyd IF: transformers' T5EncoderModel, its tokenizer, and the
prompt handling of diffusers' IF pipelines (77 tokens, attention mask given to T5, caption cleaning).

    encoder, tokenizer = load_t5("IF-I-XL-v1.0/text_encoder"), load_t5_tokenizer("IF-I-XL-v1.0/tokenizer")
    embeds = encode_t5(encoder, tokenizer, ["a photo of a cat"])          # (1, 77, 4096)

The encoder is transformers' own (frozen, used as it is): T5-v1.1-XXL's 4.7B parameters are a
matmul-bound encoder run once per prompt, which diffkern's kernels would not speed up. The UNet then
attends every one of the 77 positions (IF's way: the mask reaches T5, not the UNet).
"""

from __future__ import annotations

import html
import logging
import os
import re
import urllib.parse as ul

import torch

logger = logging.getLogger(__name__)

MAX_LENGTH = 77  # IF's prompt length (diffusers' IFPipeline.encode_prompt hard-codes it)

# diffusers' warnings when clean_caption=True lacks a library (the text of its BS4 / FTFY import errors).
_MISSING = {
    "bs4": ("{0} requires the Beautiful Soup library but it was not found in your environment. You can "
            "install it with pip: `pip install beautifulsoup4`."),
    "ftfy": ("{0} requires the ftfy library but it was not found in your environment. Checkout the "
             "instructions on the installation section: "
             "https://github.com/rspeer/python-ftfy/tree/master#installing"),
}

_URL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_BAD_PUNCT = r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}"
# DeepFloyd's caption cleaning (diffusers' IFPipeline._clean_caption), as (pattern, replacement) in
# order: before the HTML strip, between it and ftfy, and after ftfy.
_BEFORE_HTML = [
    ("<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL + "))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL + "))", ""),
]
_BEFORE_FTFY = [
    (r"@[\w\d]+\b", ""),
    # CJK strokes ... CJK unified ideographs
    (r"[\u31c0-\u31ef]+", ""), (r"[\u31f0-\u31ff]+", ""), (r"[\u3200-\u32ff]+", ""),
    (r"[\u3300-\u33ff]+", ""), (r"[\u3400-\u4dbf]+", ""), (r"[\u4dc0-\u4dff]+", ""),
    (r"[\u4e00-\u9fff]+", ""),
    # every kind of dash -> "-"
    (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
     r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+", "-"),
    (r"[`´«»“”¨]", '"'), (r"[‘’]", "'"),
    (r"&quot;?", ""), (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # ip addresses
    (r"\d:\d\d\s+$", ""),
    (r"\\n", " "),
    (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""),
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),
    (r"[\"\']{2,}", r'"'), (r"[\.]{2,}", r" "),
    (_BAD_PUNCT, r" "),
    (r"\s+\.\s+", r" "),
]
_AFTER_FTFY = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""), (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""), (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""), (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes such as 1024x768 (Latin x, Cyrillic х, ×)
    (r"\b\s+\:\s+", r": "), (r"(\D[,\./])\b", r"\1 "), (r"\s+", " "),
]
_STRIP_ENDS = [
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"), (r"^[\'\_,\-\:;]", r""), (r"[\'\_,\-\:\-\+]$", r""),
    (r"^\.\S+$", ""),
]


def _have(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def clean_caption(caption):
    """DeepFloyd's caption cleaning: urls, html, handles, CJK, odd punctuation, shop spam; lower case.

    Needs beautifulsoup4 and ftfy (ImportError without them; `preprocess_prompts` checks first)."""
    import ftfy
    from bs4 import BeautifulSoup

    def subs(text, table):
        for pattern, repl in table:
            text = re.sub(pattern, repl, text)
        return text

    caption = ul.unquote_plus(str(caption)).strip().lower()
    caption = subs(caption, _BEFORE_HTML)
    caption = BeautifulSoup(caption, features="html.parser").text
    caption = subs(caption, _BEFORE_FTFY)
    if len(re.findall(r"(?:\-|\_)", caption)) > 3:  # many dashes / underscores: word separators
        caption = re.sub(r"(?:\-|\_)", " ", caption)
    caption = html.unescape(html.unescape(ftfy.fix_text(caption)))
    caption = subs(caption, _AFTER_FTFY)
    return subs(caption, _STRIP_ENDS).strip()


def preprocess_prompts(prompts, clean=False):
    """diffusers' IF text preprocessing: with clean=True the caption cleaning applied twice (when
    beautifulsoup4 and ftfy are installed; otherwise diffusers' warnings and no cleaning), else
    lower case and stripped. A str is taken as one prompt; returns a list."""
    for module in ("bs4", "ftfy"):
        if clean and not _have(module):
            logger.warning(_MISSING[module].format("Setting `clean_caption=True`"))
            logger.warning("Setting `clean_caption` to False...")
            clean = False
    prompts = [prompts] if not isinstance(prompts, (list, tuple)) else prompts
    if clean:
        return [clean_caption(clean_caption(p)) for p in prompts]
    return [p.lower().strip() for p in prompts]


@torch.no_grad()
def encode_t5(text_encoder, tokenizer, prompts, *, max_length=MAX_LENGTH, clean=False, device=None):
    """T5 hidden states (B, max_length, d_model) of `prompts`, as diffusers' IF pipelines make them.

    Each prompt is preprocessed (`preprocess_prompts`), padded / truncated to max_length tokens
    (a warning names what truncation removed) and encoded with its attention mask; padded positions
    still get hidden states, which the UNet attends to. Returned in the encoder's dtype, on `device`
    (default: the encoder's)."""
    prompts = preprocess_prompts(prompts, clean)
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids = tokens.input_ids
    longest = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if longest.shape[-1] >= ids.shape[-1] and not torch.equal(ids, longest):
        removed = tokenizer.batch_decode(longest[:, max_length - 1:-1])
        logger.warning("The following part of your input was truncated because T5 can only handle sequences "
                       "up to %d tokens: %s", max_length, removed)
    enc_device = next(text_encoder.parameters()).device
    out = text_encoder(ids.to(enc_device), attention_mask=tokens.attention_mask.to(enc_device))
    hidden = out[0] if not isinstance(out, torch.Tensor) else out
    return hidden.to(device=device or enc_device)


def load_t5(folder, *, dtype=None, device="cpu", variant=None):
    """transformers' T5EncoderModel from a local folder (config.json + weights, sharded or not).

    dtype: e.g. torch.float16 (T5-XXL: ~9.5 GB in fp16, ~19 GB in fp32). variant: "fp16" reads
    model.fp16.safetensors (IF's folders ship both). Never downloads."""
    from transformers import T5EncoderModel

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"text_encoder: {folder} is not a folder (expected a T5EncoderModel "
                                "folder with config.json and its weights)")
    from diffkern.models.weights import reading

    kw = {"variant": variant} if variant is not None else {}
    with reading(f"{folder} (T5EncoderModel)"):
        model = T5EncoderModel.from_pretrained(folder, dtype=dtype or "auto", local_files_only=True, **kw)
    return model.to(device).eval().requires_grad_(False)


def load_t5_tokenizer(folder):
    """The T5 tokenizer from a local folder: tokenizer.json (fast) or spiece.model (sentencepiece)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer: {folder} is not a folder (expected tokenizer.json or "
                                "spiece.model of a T5 tokenizer)")
    from diffkern.models.weights import reading

    with reading(f"{folder} (T5 tokenizer)"):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
