"""The two tokenizers of GLIDE: byte-level BPE for the diffusion models, CLIP's BPE for the noised CLIP.

    tok = GlideTokenizer.from_path("glide_tokenizer/")          # encoder.json(.gz) + vocab.bpe(.gz)
    tokens, mask = tok.padded_tokens_and_mask(tok.encode("a corgi"), 128)
    clip_tok = ClipTokenizer.from_path("bpe_simple_vocab_16e6.txt.gz")
    tokens, length = clip_tok.padded_tokens_and_len(clip_tok.encode("a corgi"), 77)

Facts from OpenAI's glide_text2im/tokenizer (checked against their code):

- The GLIDE UNets (base, upsampler, inpainting) embed GPT-2's byte-level BPE: OpenAI ships
  encoder.json.gz + vocab.bpe.gz (the files of GPT-2, 50257 tokens; Hugging Face's GPT-2 folders hold
  the same as vocab.json + merges.txt). Text is lowercased first. n_vocab = len(encoder), end_token =
  n_vocab - 1. padded_tokens_and_mask truncates to text_ctx, pads with end_token (not 0) and masks
  the padding False. No start token; the empty prompt (the unconditional row) is all end_token.
- The noised CLIP embeds CLIP's own BPE (bpe_simple_vocab_16e6.txt.gz, 49408 tokens, "</w>" ending
  each word); padded_tokens_and_len gives [start] + tokens[:ctx - 2] + [end], padded with 0, and the
  length counting start and end (the text encoder reads the feature at length - 1). This padding
  rule is taken from OpenAI's simple_tokenizer as we recall it: their file was not readable here.

The BPE merge loop is written here (no tokenizer dependency): both vocabularies load from plain files.
"""

from __future__ import annotations

import gzip
import html
import json
from functools import lru_cache
from pathlib import Path

import regex

__all__ = ["ClipTokenizer", "GlideTokenizer", "load_glide_tokenizer"]

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other runs, whitespace
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_NEVER = float("inf")
# CLIP's: special tokens kept whole, single digits, no leading spaces
_CLIP_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


@lru_cache
def bytes_to_unicode():
    """Byte -> printable character table of byte-level BPE: printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) for chr(256 + n), so no piece holds whitespace."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def _read_text(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    from diffkern.models.weights import CheckpointError

    try:
        data = path.read_bytes()
        return (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:  # unreadable, a broken gzip, not UTF-8
        raise CheckpointError(f"{path}: cannot read the tokenizer file ({type(e).__name__}: {e})") from e


def _json_object(path):
    from diffkern.models.weights import CheckpointError

    try:
        value = json.loads(_read_text(path))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
        raise CheckpointError(f"{path}: expected a JSON object {{token: id}}, got {type(value).__name__}")
    return value


def _find(folder, names, what):
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no {what} (looked for {', '.join(names)})")


class _BytePairEncoder:
    """Byte-level BPE: regex pre-tokens -> bytes as characters -> repeated lowest-rank merges -> ids."""

    def __init__(self, encoder, merges, pattern, end_of_word=""):
        self.encoder = dict(encoder)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.pattern = regex.compile(pattern, regex.IGNORECASE if end_of_word else 0)
        self.end_of_word = end_of_word
        specials = ("<|startoftext|>", "<|endoftext|>") if end_of_word else ()
        self.special = {t for t in specials if t in self.encoder}
        self._cache = {}

    def _merge(self, word):
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + self.end_of_word]
        while len(parts) > 1:
            rank, first = min((self.ranks.get(p, _NEVER), i) for i, p in enumerate(zip(parts, parts[1:])))
            if rank == _NEVER:
                break
            pair = (parts[first], parts[first + 1])
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def _ids(self, text):
        table = bytes_to_unicode()
        ids = []
        for piece in self.pattern.findall(text):
            if piece in self.special:  # CLIP's <|startoftext|> / <|endoftext|> written in the text
                ids.append(self.encoder[piece])
                continue
            word = "".join(table[b] for b in piece.encode("utf-8"))
            for part in self._merge(word):
                if part not in self.encoder:
                    raise ValueError(f"tokenizer: BPE piece {part!r} is not in the vocabulary "
                                     "(vocabulary and merges files do not belong together)")
                ids.append(self.encoder[part])
        return ids

    @property
    def n_vocab(self):
        return len(self.encoder)

    def decode(self, tokens):
        """Text of token ids (byte-level, invalid UTF-8 replaced)."""
        back = {c: b for b, c in bytes_to_unicode().items()}
        text = "".join(self.decoder[int(t)] for t in tokens)
        if self.end_of_word:  # CLIP: a word end is a space
            text = text.replace(self.end_of_word, bytes_to_unicode()[ord(" ")])
        return bytes(back[c] for c in text if c in back).decode("utf-8", errors="replace").strip()


class GlideTokenizer(_BytePairEncoder):
    """GPT-2 byte-level BPE as GLIDE's text2im models use it (lowercased, end-token padding)."""

    def __init__(self, encoder, merges):
        super().__init__(encoder, merges, _GPT2_PATTERN)

    @classmethod
    def from_path(cls, path):
        """A folder holding encoder.json(.gz) + vocab.bpe(.gz) (OpenAI's) or vocab.json + merges.txt
        (a Hugging Face GPT-2 folder)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"GlideTokenizer.from_path: path must be a folder, got {folder}")
        enc = _find(folder, ("encoder.json.gz", "encoder.json", "vocab.json"), "vocabulary")
        bpe = _find(folder, ("vocab.bpe.gz", "vocab.bpe", "merges.txt"), "merges file")
        encoder = _json_object(enc)
        lines = _read_text(bpe).split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]  # line 0 is "#version"
        return cls(encoder, merges)

    @property
    def end_token(self):
        return self.n_vocab - 1

    def encode(self, text):
        """Token ids of `text` (lowercased first, as GLIDE does); no start or end token."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        return self._ids(text.lower())

    def padded_tokens_and_mask(self, tokens, text_ctx):
        """(tokens[:text_ctx] padded with end_token to text_ctx, mask True on the real tokens)."""
        tokens = list(tokens)[:text_ctx]
        pad = text_ctx - len(tokens)
        return tokens + [self.end_token] * pad, [True] * len(tokens) + [False] * pad


class ClipTokenizer(_BytePairEncoder):
    """CLIP's BPE ("</w>" word ends, start/end tokens) as GLIDE's noised CLIP text encoder uses it."""

    def __init__(self, encoder, merges):
        super().__init__(encoder, merges, _CLIP_PATTERN, end_of_word="</w>")

    @classmethod
    def from_path(cls, path):
        """OpenAI's bpe_simple_vocab_16e6.txt(.gz), or a CLIP tokenizer folder (vocab.json + merges.txt)."""
        path = Path(path)
        if path.is_dir():
            encoder = _json_object(_find(path, ("vocab.json",), "vocab.json"))
            lines = _read_text(_find(path, ("merges.txt",), "merges.txt")).split("\n")
            merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
            return cls(encoder, merges)
        lines = _read_text(path).split("\n")
        # CLIP keeps the first 49152 - 256 - 2 merges; its vocabulary is the 256 byte characters, the
        # same with "</w>", one entry per merge, then the two special tokens
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1] if line.strip()]
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        return cls({v: i for i, v in enumerate(vocab)}, merges)

    @property
    def start_token(self):
        return self.encoder["<|startoftext|>"]

    @property
    def end_token(self):
        return self.encoder["<|endoftext|>"]

    def encode(self, text):
        """Token ids of `text` after CLIP's cleaning (HTML unescape, whitespace collapse, lowercase)."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        text = html.unescape(html.unescape(text)).strip()  # (CLIP also runs ftfy when installed)
        text = regex.sub(r"\s+", " ", text).strip().lower()
        return self._ids(text)

    def padded_tokens_and_len(self, tokens, text_ctx):
        """([start] + tokens[:text_ctx - 2] + [end] padded with 0 to text_ctx, that length)."""
        tokens = [self.start_token] + list(tokens)[: text_ctx - 2] + [self.end_token]
        return tokens + [0] * (text_ctx - len(tokens)), len(tokens)


def load_glide_tokenizer(path):
    """GlideTokenizer from a folder, or a transformers GPT-2 tokenizer object used as it is (wrapped)."""
    if hasattr(path, "get_vocab") and hasattr(path, "bpe_ranks"):  # transformers' slow GPT2Tokenizer
        merges = sorted(path.bpe_ranks, key=path.bpe_ranks.get)
        return GlideTokenizer(path.get_vocab(), merges)
    return GlideTokenizer.from_path(path)
