"""Scoring explanations: a family of scorers (simulation, detection, fuzzing) with controls.

`records` is the scores.jsonl record (one per hook, latent, kind) with its one reader and
one writer; `correlation` is the simulation scorer's metric (Pearson over scored tokens).
"""

from safesail.interpret.scoring.correlation import (SCORE_FAILURES, LatentScore, ScoreUndefined, SegmentSim,
                                                    pearson, score_segments)
from safesail.interpret.scoring.records import ScoreRecord, ScoreWriter, read_scores, scores_by_latent

__all__ = ["SCORE_FAILURES", "LatentScore", "ScoreRecord", "ScoreUndefined", "ScoreWriter", "SegmentSim",
           "pearson", "read_scores", "score_segments", "scores_by_latent"]
