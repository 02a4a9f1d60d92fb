"""Adaptive paths: a router picks the layer path for each prompt from a few candidates.

- ``core``: Router — features (the identity prefix's pooled hidden state), the classifier as
  plain arrays, save / load as one JSON file, ``choose`` / ``path_for``;
- ``run``: running batches through a router (each group of rows along its candidate, reusing
  the shared identity prefix) — what Model.generate / logits / score, the server and the
  lm-eval adapter call for ``layers=router``;
- ``train``: ``train_router(result, ...)`` — candidates, labels and a scikit-learn classifier
  from a sweep's per-item search records;
- ``evaluate``: the held-out reading (router vs baseline, best fixed path and oracle, with
  paired bootstrap CIs) behind ``Router.report``.

``train`` and ``evaluate`` need the sweep package and load on first use
(``circuit_finder.train_router``); this package's import stays light for Model.
"""

from .core import Router, RouterError

__all__ = ["Router", "RouterError"]
