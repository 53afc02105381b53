"""Tiny models of each tool-calling family: a tokenizer with the family's special tokens and real
chat template (tests/tool_templates.py), and weights that greedily spell out a given output.

A random tiny model never writes a tool call. A "scripted" one does, through the real engine:
its attention and MLP outputs are zero, so the last hidden state is the embedding of the last
token alone, and the model is a bigram table. The output's pieces are tokens of their own
(added tokens, all different), each with a one-hot embedding; lm_head sends piece i to piece
i + 1, the last piece to EOS, and every other token (the prompt's last one, whatever it is) to
the first piece:

    embedding   piece i -> e_i          any other token -> e_63
    lm_head     e_i -> piece i + 1      e_last -> EOS     e_63 -> piece 0
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tool_templates import LLAMA3_1, MISTRAL_V0_3, QWEN2_5

from conftest import ARCHS, BASE, CORPUS


@dataclass(frozen=True)
class Family:
    arch: str  # conftest.ARCHS key
    template: str
    specials: tuple[str, ...]  # special tokens (skipped when decoding with skip_special_tokens)
    added: tuple[str, ...]  # plain added tokens the family's tokenizer has
    bos: str
    eos: str


FAMILIES = {
    "qwen2.5": Family("qwen2", QWEN2_5, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                      ("<tool_call>", "</tool_call>"), "<|endoftext|>", "<|im_end|>"),
    "llama3.1": Family("llama", LLAMA3_1, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                           "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
                       (), "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-v0.3": Family("mistral", MISTRAL_V0_3, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
                                                     "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                                                     "[/TOOL_RESULTS]"), (), "<s>", "</s>"),
}
_HIDDEN = BASE["hidden_size"]


def make_family_tokenizer(folder: Path, family: str, pieces: tuple[str, ...] = ()):
    """The family's tokenizer (a small byte-level BPE under its special tokens and template),
    with `pieces` as added tokens of their own; saved in `folder` and returned."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(fam.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.eos)
    new = [p for p in (*fam.added, *pieces) if p not in fast.get_vocab()]
    fast.add_tokens([AddedToken(p, special=False, normalized=False) for p in new])
    fast.chat_template = fam.template
    fast.save_pretrained(folder)
    return fast


def make_scripted_model(folder: Path, family: str, pieces: tuple[str, ...]) -> Path:
    """A tiny model of the family's architecture whose greedy output is "".join(pieces), then EOS."""
    import transformers

    assert len(set(pieces)) == len(pieces) < _HIDDEN, "pieces must be different tokens, fewer than hidden_size"
    tok = make_family_tokenizer(folder, family, pieces)
    ids = [tok.convert_tokens_to_ids(p) for p in pieces]
    assert all(tok.convert_ids_to_tokens(i) == p for i, p in zip(ids, pieces)), "each piece must be one token"
    cfg_name, model_name, extra = ARCHS[FAMILIES[family].arch]
    # room for the tools in the prompt: the tiny BPE spends many tokens on their JSON
    cfg = getattr(transformers, cfg_name)(**{**BASE, **extra, "tie_word_embeddings": False,
                                             "max_position_embeddings": 4096, "bos_token_id": tok.bos_token_id,
                                             "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".o_proj." in name or ".down_proj." in name:
                p.zero_()  # no attention, no MLP: logits depend on the last token alone
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb.zero_()
        emb[:, _HIDDEN - 1] = 1.0  # every other token ...
        head.zero_()
        head[ids[0], _HIDDEN - 1] = 10.0  # ... starts the script
        for i, t in enumerate(ids):
            emb[t] = 0.0
            emb[t, i] = 1.0
            head[ids[i + 1] if i + 1 < len(ids) else tok.eos_token_id, i] = 10.0
    model.save_pretrained(folder)
    return folder
