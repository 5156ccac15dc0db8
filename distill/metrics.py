"""Scores of generated completions against references on the user's own data (``data.metric``).

The built-in tasks score themselves with exact metrics (``distill.tasks``); free text needs a
graded one, because exact match of a paraphrase is 0:

| metric    | what                                                    | from           |
|-----------|---------------------------------------------------------|----------------|
| `chrf`    | character n-gram F-score, 0-100 (the default: robust for short and long text, any language) | sacrebleu |
| `bleu`    | corpus BLEU, 0-100                                      | sacrebleu      |
| `rouge_l` | mean ROUGE-L F-measure (longest common subsequence), 0-1 | rouge-score   |
| `exact`   | exact match after whitespace normalisation, as `accuracy` | -            |
| `none`    | no generation at all (the losses are still reported)    | -              |
"""

from __future__ import annotations

METRICS = ("auto", "chrf", "bleu", "rouge_l", "exact", "none")
DEFAULT_FREE_TEXT = "chrf"


def resolve(metric: str) -> str:
    """The metric ``auto`` stands for on free text."""
    return DEFAULT_FREE_TEXT if metric == "auto" else metric


def sample_scores(predictions: list[str], references: list[str], metric: str) -> list[float]:
    """Each prediction's own score by ``metric``: 1 or 0 for ``exact``, the sentence-level chrF or
    BLEU (0-100), or ROUGE-L (0-1); for sampled evaluation, where every sample is scored alone."""
    metric = resolve(metric)
    preds = [" ".join(p.split()) for p in predictions]
    refs = [" ".join(r.split()) for r in references]
    if metric == "exact":
        return [float(p == r) for p, r in zip(preds, refs, strict=True)]
    if metric == "chrf":
        from sacrebleu.metrics import CHRF

        chrf = CHRF()
        return [chrf.sentence_score(p, [r]).score for p, r in zip(preds, refs, strict=True)]
    if metric == "bleu":
        from sacrebleu.metrics import BLEU

        bleu = BLEU(effective_order=True)
        return [bleu.sentence_score(p, [r]).score for p, r in zip(preds, refs, strict=True)]
    if metric == "rouge_l":
        from rouge_score.rouge_scorer import RougeScorer

        scorer = RougeScorer(["rougeL"])
        return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)]
    raise ValueError(f"sample_scores: no per-sample score for data.metric={metric!r}")


def text_scores(predictions: list[str], references: list[str], metric: str) -> dict[str, float]:
    """``{name: score}`` of ``predictions`` against ``references`` by ``metric`` (see the table)."""
    metric = resolve(metric)
    preds = [" ".join(p.split()) for p in predictions]
    refs = [" ".join(r.split()) for r in references]
    if metric == "none" or not refs:
        return {}
    if metric == "exact":
        return {"accuracy": sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs)}
    if metric == "chrf":
        from sacrebleu.metrics import CHRF

        return {"chrf": CHRF().corpus_score(preds, [refs]).score}
    if metric == "bleu":
        from sacrebleu.metrics import BLEU

        return {"bleu": BLEU(effective_order=True).corpus_score(preds, [refs]).score}
    if metric == "rouge_l":
        from rouge_score.rouge_scorer import RougeScorer

        scorer = RougeScorer(["rougeL"])
        return {"rouge_l": sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True))
                / len(refs)}
    raise ValueError(f"data.metric must be one of {', '.join(METRICS)}; got {metric!r}")
