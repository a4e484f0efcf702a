"""The CLIP tokenizer, built offline from the CLIP BPE file shipped with the package.

Stable Diffusion 1.x and the tiny SD of this project read prompts through OpenAI's CLIP tokenizer.
Its usual home is a model hub, which these machines cannot reach, so the package carries the
original byte-pair-encoding file (`assets/bpe_simple_vocab_16e6.txt.gz`, MIT licence, from
openai/CLIP) and derives the vocabulary from it the same way CLIP itself does:

    vocab = 256 byte symbols + the same 256 with "</w>" + every merge joined + 2 special tokens

which gives 49,408 ids, `<|startoftext|>` = 49406 and `<|endoftext|>` = 49407.

Left out: SD2.x's OpenCLIP tokenizer pads with "!" instead of `<|endoftext|>`; `clip_tokenizer`
takes `pad_token` for that.
"""

import gzip
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77  # CLIP's context: 75 prompt tokens between the start and end markers
N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file, no more


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters, in CLIP's vocabulary order.

    Printable bytes stand for themselves and come first; the other 68 bytes are moved to code
    points 256.. and follow, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Derive CLIP's vocabulary and merge list from the BPE file (line 0 is a header)."""
    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 1 + N_MERGES]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A transformers CLIPTokenizer equal to SD1.5's, with no download."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], pad_token=pad_token, model_max_length=MAX_LENGTH)
