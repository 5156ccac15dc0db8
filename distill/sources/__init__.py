"""Sources of training sequences: each turns a batch of prompts into sequences for the loss
(``docs/algorithms.md``, "Sources of training sequences").

``REGISTRY`` names every source; a step draws one by the weights in ``sources.weights``
(``distill.sources.mixture``). A new source is a ``Source`` in a file of its own and a line here.
"""

from __future__ import annotations

from distill.config import DistillConfig, as_member, member_configs, sources_in_use
from distill.errors import DistillError
from distill.sources.base import Source
from distill.sources.dataset import DatasetSource
from distill.sources.on_policy import OnPolicySource
from distill.sources.seqkd import SeqKDSource
from distill.sources.skd import SKDSource

REGISTRY: dict[str, Source] = {
    "dataset": DatasetSource(),
    "teacher": SeqKDSource(),
    "student": OnPolicySource(),
    "skd": SKDSource(),
}


def check(cfg: DistillConfig) -> list[Source]:
    """The sources ``cfg`` draws from, in registry order; DistillError for a weight that names no
    source, a source that generates with a teacher the config does not have, or one whose
    sequences an offline teacher cache cannot hold where no live teacher is loaded."""
    unknown = [n for n in cfg.sources.weights if n not in REGISTRY]
    if unknown:
        raise DistillError(f"sources.weights.{unknown[0]}: no such source; the sources are {', '.join(REGISTRY)}")
    used = sources_in_use(cfg.sources.weights)
    if cfg.teachers:  # several teachers: each checked as the one teacher of its own config
        for name in used:
            if REGISTRY[name].needs_teacher:
                raise DistillError(f"sources.weights.{name}: {REGISTRY[name].what} come from one teacher; with several "
                                   "(teachers) the dataset and the student's samples are the sources")
        for member, view in member_configs(cfg).items():
            try:
                check(view)
            except DistillError as e:
                raise as_member(e, member) from None
        return [s for n, s in REGISTRY.items() if n in used]
    for name in used:
        if REGISTRY[name].needs_teacher and not cfg.teacher.path:
            raise DistillError(f"sources.weights.{name} generates with the teacher, but teacher.path is not set")
        if cfg.teacher.cache and not cfg.teacher.live and not REGISTRY[name].fixed and (
                REGISTRY[name].needs_teacher or cfg.loss.kind != "ce"):
            raise DistillError(f"sources.weights.{name}: {REGISTRY[name].what} are not known before the run, so "
                               f"teacher.cache={cfg.teacher.cache} cannot hold the teacher's view of them; add "
                               "teacher.live=true to load the teacher for them too")
    return [s for n, s in REGISTRY.items() if n in used]
