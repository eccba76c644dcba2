"""Sections of ``scripts/benchmark.py``, one module each, registered by name in :data:`SECTIONS`.

The order of :data:`SECTIONS` is the order in which ``--only``'s default runs them and prints their tables.
To add a section, see the docstring of ``scripts/benchmark.py``.
"""

from __future__ import annotations

from scripts.bench import data_pipeline, gradcam, pretrain_step, retrieval_eval, retrieval_step, ve_nlvr, vqa
from scripts.bench.common import Section

SECTIONS: dict[str, Section] = {
    "pretrain_step": pretrain_step.SECTION,
    "data_pipeline": data_pipeline.SECTION,
    "retrieval_eval": retrieval_eval.SECTION,
    "retrieval_step": retrieval_step.SECTION,
    "gradcam": gradcam.SECTION,
    "vqa": vqa.SECTION,
    "ve": ve_nlvr.VE_SECTION,
    "nlvr": ve_nlvr.NLVR_SECTION,
}
