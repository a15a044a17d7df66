"""Whole-query context for `score.granularity=query`: each score segment's source document.

Collect records a segment's corpus document (`doc_id`) and its position in it
(`start`); this module re-reads those documents from the explanation corpus with the
source model's tokenizer and returns the document's tokens (rendered exactly as
collect renders a segment's tokens) with the segment's offset in them. A document
longer than `max_tokens` is cut to that many tokens around the segment.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from safesail.errors import UserError
from safesail.interpret.scoring.inputs import WindowLookup
from safesail.rundir import RunDir
from safesail.token_text import token_pieces

log = logging.getLogger(__name__)


def load_tokenizer(cfg: DictConfig):
    from transformers import AutoTokenizer

    from safesail.models.loading import model_folder

    return AutoTokenizer.from_pretrained(model_folder(cfg.model, cfg.get("cache_dir")))


def document_tokens(cfg: DictConfig, doc_ids: set[int], tokenizer) -> dict[int, list[int]]:
    """Token ids of the wanted corpus documents (read in corpus order, stopping when all are found)."""
    from safesail.corpus import iter_documents, tokenize_document
    from safesail.interpret.collect import corpus_cfg

    out: dict[int, list[int]] = {}
    if not doc_ids:
        return out
    for doc in iter_documents(corpus_cfg(cfg), tokenizer, cfg.model.get("system_prompt")):
        if doc.doc_id in doc_ids:
            out[doc.doc_id] = tokenize_document(doc, tokenizer)
            if len(out) == len(doc_ids):
                break
    return out


def window_lookup(rd: RunDir, cfg: DictConfig, hook: str, segments: list[dict],
                  max_tokens: int = 384) -> WindowLookup:
    """A lookup from a score segment to (its source query's tokens, the segment's offset in them)."""
    tok = load_tokenizer(cfg)
    docs = document_tokens(cfg, {int(s["doc_id"]) for s in segments}, tok)
    def lookup(seg: dict) -> tuple[list[str], int]:
        ids = docs.get(int(seg["doc_id"]))
        start, n = int(seg["start"]), len(seg["token_ids"])
        if ids is None or ids[start:start + n] != list(seg["token_ids"]):
            raise UserError(f"segment {seg['segment_id']} of latent {seg['latent']} at {hook} is not where collect "
                            "found it in the corpus (the corpus or model changed?); run `safesail collect` again "
                            "or use score.granularity=segment.")
        a, b = 0, len(ids)
        if b > max_tokens:
            a = max(0, min(start - (max_tokens - n) // 2, b - max_tokens))
            b = a + max_tokens
        return token_pieces(tok, ids[a:b]), start - a

    return lookup
