"""The real CLIP BPE tokenizer of SD1, built offline from the vocabulary that open-clip-torch ships.

SD1's text encoder uses the tokenizer of ``openai/clip-vit-large-patch14``. Its vocabulary is the
byte-level BPE table in ``open_clip/bpe_simple_vocab_16e6.txt.gz``; turning that table into
``vocab.json`` / ``merges.txt`` gives the identical tokenizer without a hub download.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

from ..common.errors import CheckpointError
from ..common.i18n import tr

# The table's first line is a header; CLIP keeps 49152 - 256 - 2 merges after it.
_MERGE_COUNT = 49152 - 256 - 2
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _byte_symbols() -> list[str]:
    """The 256 stand-ins byte-level BPE uses for raw bytes, in vocabulary order.

    Printable bytes stand for themselves and come first; the others map to chr(256 + n) in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _bpe_table() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(tr("The CLIP vocabulary needs the open-clip-torch package (pip install --no-deps "
                                 "open-clip-torch)."))
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_tokenizer_files(folder: Path) -> Path:
    """Write vocab.json and merges.txt of the CLIP tokenizer into ``folder`` (idempotent)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.exists() and merges_path.exists():
        return folder
    lines = gzip.open(_bpe_table(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _MERGE_COUNT]]
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(_SPECIAL)
    vocab = {token: index for index, token in enumerate(vocab_list)}
    # Write beside and rename, so a concurrent reader never sees half a file.
    for path, text in ((merges_path, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"),
                       (vocab_path, json.dumps(vocab, ensure_ascii=False))):
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    return folder


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRAIN_TOOLS_CACHE", Path.home() / ".cache" / "train_tools"))


@lru_cache(maxsize=1)
def clip_tokenizer():
    """A transformers ``CLIPTokenizer`` identical to clip-vit-large-patch14's."""
    from transformers import CLIPTokenizer

    folder = write_tokenizer_files(default_cache_dir() / "clip-vit-large-patch14-tokenizer")
    return CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"),
        merges_file=str(folder / "merges.txt"),
        bos_token=_SPECIAL[0],
        eos_token=_SPECIAL[1],
        pad_token=_SPECIAL[1],
        unk_token=_SPECIAL[1],
        model_max_length=77,
    )


def chunked_token_ids(captions: list[str], pad_id: int) -> list:
    """Token ids as the WebUI feeds a CLIP text encoder: 75 tokens per chunk, each chunk framed by start and end
    tokens and padded to 77 with ``pad_id``; every caption gets as many chunks as the longest one (B, 77·k)."""
    import torch

    tokenizer = clip_tokenizer()
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = tokenizer(captions, add_special_tokens=False, truncation=False)["input_ids"]
    chunks = max(1, *(-(-len(caption_ids) // 75) for caption_ids in ids))
    rows = []
    for caption_ids in ids:
        row = []
        for index in range(chunks):
            part = caption_ids[index * 75:(index + 1) * 75]
            row += [start, *part, end] + [pad_id] * (75 - len(part))
        rows.append(row)
    return torch.tensor(rows)
