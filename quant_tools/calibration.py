"""Calibration text for AWQ: a file of the user's (plain text, documents split at blank lines; or
jsonl with a "text" field per line), or by default the calibration share of the Wikipedia
articles in quant_tools/wikitext.py, cut into token blocks as AutoAWQ does (documents joined,
then `samples` blocks of `seqlen`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from quant_tools import wikitext

log = logging.getLogger("lmq")


def default_documents() -> list[str]:
    """Wikipedia articles (the held-out ones stay out: bench/awq.py measures perplexity on them)."""
    return wikitext.split(held_out=False)


def read_documents(path: str) -> list[str]:
    """A .jsonl file (one {"text": ...} object per line) or any text file (documents separated
    by blank lines)."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--calib-data {path}: cannot be read as UTF-8 text: {e}") from None
    if p.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--calib-data {path}, line {n}: not JSON: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"--calib-data {path}, line {n}: expected an object with a string field 'text'")
            docs.append(obj["text"])
    else:
        docs = [d for d in raw.split("\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"--calib-data {path}: no text in it")
    return docs


def token_blocks(tokenizer: object, documents: list[str], samples: int, seqlen: int) -> torch.Tensor:
    """[n, seqlen] int64 token ids, n = samples, or fewer (with a warning) when the text is short."""
    ids: list[int] = []
    need = samples * seqlen
    for doc in documents:
        ids.extend(tokenizer(doc.strip(), add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    n = min(samples, len(ids) // seqlen)
    if n == 0:
        raise ValueError(f"the calibration text has {len(ids)} tokens: fewer than one block of "
                         f"--calib-seqlen {seqlen}")
    if n < samples:
        log.warning("lmq awq: the calibration text makes %d blocks of %d tokens, not %d", n, seqlen, samples)
    return torch.tensor(ids[:n * seqlen]).view(n, seqlen)
