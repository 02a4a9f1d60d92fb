"""Router: the object that picks one of a few candidate layer paths for each prompt.

A router reads a prompt's features — the identity path's hidden state entering layer ``layer``
(after identity slots 0..layer-1), pooled over the prompt's tokens ("mean", "last" or both) — and
a light classifier turns them into a candidate index. The classifier is stored as plain arrays
(standardisation mean/scale, weights, bias) and applied here with numpy, so a saved router is one
JSON file that loads without scikit-learn and without pickle. Training is ``router.train``,
running prompts along their chosen paths ``router.run``, the held-out reading ``router.evaluate``.

Limits: features are read from token ids, so a prompt is routed by exactly the ids the model
runs (a chat template applied or not, or its thinking switch, makes a different prompt:
``check_prompts`` warns where Model.generate or a sweep writes prompts otherwise than the router's
training did; the server and the lm-eval adapter take prompts as given and cannot tell); the
classifier kinds are logistic regression, nearest centroid and a constant choice.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_file
from ..generation import positions_from_mask
from ..layer_path import LayerPath
from . import reading

__all__ = ["KINDS", "POOLINGS", "Router", "RouterError"]

POOLINGS = ("mean", "last", "mean+last")
KINDS = ("logistic", "centroid", "constant")
FORMAT = "circuit-finder-router"


def _switches_thinking(codec) -> bool:
    """Whether codec's chat template writes a prompt otherwise with thinking on than off (True when
    there is no codec to ask)."""
    if codec is None:
        return True
    message = [{"role": "user", "content": "?"}]
    return codec.chat_text(message, thinking=True) != codec.chat_text(message, thinking=False)


class RouterError(ValueError):
    """A router file or router that cannot be used (wrong format, another model, bad arrays)."""


@dataclass(eq=False)
class Router:
    """Picks a candidate path per prompt. ``candidates[k]`` is the path of class k.

    kind "logistic": scores = z @ weights.T + bias (one row: binary, class 1 when > 0);
    "centroid": nearest row of ``weights``; "constant": always ``classes[0]``. z is the pooled
    feature standardised by ``mean`` / ``scale``. ``classes`` maps classifier outputs to
    candidate indices. ``training`` and ``evaluation`` are what train_router and evaluate found
    (read by ``report``). Use it as ``layers=router`` in Model.generate / logits / score.
    """

    name: str
    candidates: list[LayerPath]
    layer: int
    pooling: str
    num_layers: int
    hidden_size: int
    kind: str
    classes: list[int]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    training: dict = field(default_factory=dict)
    evaluation: dict | None = None
    source: str | None = None  # the file it was loaded from

    def __post_init__(self):
        self._checked: set = set()  # model sources check() compared fingerprints with; prompt settings warned of
        self.candidates = [c if isinstance(c, LayerPath) else LayerPath.parse(str(c)) for c in self.candidates]
        self.classes = [int(c) for c in self.classes]
        self.mean, self.scale = np.asarray(self.mean, np.float64), np.asarray(self.scale, np.float64)
        self.weights, self.bias = np.asarray(self.weights, np.float64), np.asarray(self.bias, np.float64)
        self._check()

    def _check(self) -> None:
        where = f"router {self.name!r}" + (f" ({self.source})" if self.source else "")
        problems = []
        if not self.candidates:
            problems.append("no candidate paths")
        if self.pooling not in POOLINGS:
            problems.append(f"pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.kind not in KINDS:
            problems.append(f"classifier kind {self.kind!r} is not one of {KINDS}")
        if not 1 <= self.layer <= self.num_layers:
            problems.append(f"feature layer {self.layer} is outside 1..{self.num_layers}")
        if not self.classes or any(not 0 <= c < len(self.candidates) for c in self.classes):
            problems.append(f"classes {self.classes} must index the {len(self.candidates)} candidates")
        d = self.feature_size
        if self.mean.shape != (d,) or self.scale.shape != (d,) or not np.all(self.scale > 0):
            problems.append(f"mean and scale must be {d} values (scale > 0) for {self.pooling} features of hidden "
                            f"size {self.hidden_size}")
        rows = {"logistic": 1 if len(self.classes) == 2 else len(self.classes), "centroid": len(self.classes),
                "constant": 0}.get(self.kind, 0)
        if self.kind != "constant" and (self.weights.shape != (rows, d) or self.bias.shape != (rows,)):
            problems.append(f"{self.kind} weights must be [{rows}, {d}] and bias [{rows}], got "
                            f"{list(self.weights.shape)} and {list(self.bias.shape)}")
        if not all(np.isfinite(a).all() for a in (self.mean, self.scale, self.weights, self.bias)):
            problems.append("the arrays hold NaN or infinite values")
        if problems:
            raise RouterError(f"{where}: " + "; ".join(problems))

    # ------------------------------------------------------------------ identity
    @property
    def feature_size(self) -> int:
        return self.hidden_size * (2 if self.pooling == "mean+last" else 1)

    @property
    def digest(self) -> str:
        """sha256 of what decides a routing (candidates, features, classifier), not of its reports."""
        d = self.to_dict()
        for k in ("name", "training", "evaluation"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    @property
    def key(self) -> str:
        """The layers column of its sweep records: router:NAME@digest."""
        return f"router:{self.name}@{self.digest[:12]}"

    def __repr__(self) -> str:
        cands = ", ".join(str(c) for c in self.candidates)
        return (f"Router({self.name!r}: {len(self.candidates)} candidates [{cands}], {self.kind}, {self.pooling} "
                f"features entering layer {self.layer})")

    def reuses(self, candidate: int) -> bool:
        """Whether candidate ``candidate`` goes on from the feature pass (its first ``layer`` slots
        are the identity path's) rather than from the embedding."""
        return self.candidates[candidate].identity_prefix(self.num_layers) >= self.layer

    def check(self, model) -> None:
        """RouterError unless this router was made for a model of this shape."""
        c = model.config
        if c.num_layers != self.num_layers or c.hidden_size != self.hidden_size:
            raise RouterError(f"router {self.name!r}{f' ({self.source})' if self.source else ''} was trained for a "
                              f"model with {self.num_layers} layers and hidden size {self.hidden_size}; "
                              f"{model.source} has {c.num_layers} and {c.hidden_size}")
        for path in self.candidates:
            model.path(path)
        trained_on = (self.training or {}).get("fingerprint")
        seen = model.source if model.load_options.get("from_file") else id(model)  # in-memory models: each one
        if trained_on and seen not in self._checked:
            self._checked.add(seen)
            if trained_on != model.fingerprint():
                warnings.warn(f"router {self.name!r} was trained on other weights ({self.training.get('model')}) "
                              f"than {model.source}'s: its features may mean something else here", stacklevel=3)
            if self.training.get("mode") == "likelihood" and self.training.get("prompt") != "whole":
                warnings.warn(f"router {self.name!r} was trained (before 2026-11-26) on likelihood contexts cut "
                              f"before their trailing whitespace; it now reads whole prompts, so its choices may "
                              f"differ from its training's: train it again", stacklevel=3)

    def check_prompts(self, chat: bool, thinking: bool | None = None, codec=None) -> None:
        """Warns (once per setting) when prompts are written with the chat template and this router's
        training sweep wrote them without it, or the other way round; or, both with the template,
        with its thinking switch set otherwise than that sweep set it (where ``codec``'s template
        has such a switch): its features then read other tokens than it was trained on and its
        choices may not hold (a router saved without that record is not checked)."""
        trained = (self.training or {}).get("chat")
        if trained is None:
            return
        said = lambda c: "with the chat template" if c else "as plain text, without the chat template"  # noqa: E731
        if bool(trained) != bool(chat):
            self._warn_once(("chat", bool(chat)), f"were written {said(trained)}; these are written {said(chat)}")
        elif chat and thinking is not None and bool(thinking) != self.thinking and \
                ("thinking", bool(thinking)) not in self._checked:
            if not _switches_thinking(codec):  # the same prompt either way: nothing to warn of
                self._checked.add(("thinking", bool(thinking)))
                return
            on = lambda t: "on" if t else "off"  # noqa: E731
            self._warn_once(("thinking", bool(thinking)), f"had the chat template's thinking switch "
                            f"{on(self.thinking)}; these have it {on(thinking)}")

    def _warn_once(self, setting: tuple, what: str) -> None:
        if setting in self._checked:
            return
        self._checked.add(setting)
        warnings.warn(f"router {self.name!r}'s training prompts {what}, so its features read other tokens and its "
                      f"choices may not hold", stacklevel=4)

    # ------------------------------------------------------------------ features and choices
    def prefix(self, model, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache=None):
        """Hidden states [B, T, H] entering layer ``layer`` along the identity path (``cache``: a
        KV cache of ``layer`` slots to fill, or None)."""
        h = model.engine.embed(ids)
        return model.engine.run_slots(h, positions, mask, list(range(self.layer)), cache, 0, self.layer)

    def pool(self, h: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
        """Hidden states [B, T, H] (mask [B, T] or None) -> features [B, feature_size]; "last" reads
        each row's last real token, wherever the padding is."""
        h = h.double()
        parts = []
        if self.pooling in ("mean", "mean+last"):
            w = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device) if mask is None else (mask != 0).to(h.dtype)
            parts.append((h * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1))
        if self.pooling in ("last", "mean+last"):
            if mask is None:
                parts.append(h[:, -1])
            else:  # (the largest position holding a real token)
                at = ((mask != 0).long() * torch.arange(1, h.shape[1] + 1, device=mask.device)).argmax(1).to(h.device)
                parts.append(h[torch.arange(h.shape[0], device=h.device), at])
        return torch.cat(parts, -1).cpu().numpy()

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Features [B, feature_size] -> candidate indices [B]."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.feature_size:
            raise RouterError(f"router {self.name!r}: features must be [batch, {self.feature_size}], got {list(x.shape)}")
        classes = np.asarray(self.classes)
        if self.kind == "constant":
            return np.full(len(x), classes[0])
        z = (x - self.mean) / self.scale
        if self.kind == "centroid":
            d = ((z[:, None, :] - self.weights[None]) ** 2).sum(-1)
            return classes[d.argmin(1)]
        scores = z @ self.weights.T + self.bias
        if scores.shape[1] == 1:
            return classes[(scores[:, 0] > 0).astype(int)]
        return classes[scores.argmax(1)]

    def features(self, model, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> np.ndarray:
        """Token-id prompts -> their features [n, feature_size] (left-padded batches)."""
        out = []
        with torch.inference_mode():
            for at in range(0, len(seqs), batch_size):
                ids, mask = model.codec.left_pad(seqs[at:at + batch_size], model.device)
                padded = None if bool((mask != 0).all()) else mask
                positions = positions_from_mask(mask)
                out.append(self.pool(self.prefix(model, ids, positions, padded), padded))
        return np.concatenate(out) if out else np.zeros((0, self.feature_size))

    def choose(self, model, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> list[int]:
        """Token-id prompts -> the candidate index each is routed to (a constant router reads none)."""
        if self.kind == "constant":
            return [self.classes[0]] * len(seqs)
        return [int(c) for c in self.predict(self.features(model, seqs, batch_size))]

    @property
    def thinking(self) -> bool:
        """The chat template's thinking switch as the training sweep set it (False unless it left
        thinking on): how its prompts were written, and so how a prompt is best read to route it."""
        return bool((self.training or {}).get("thinking", False))

    def path_for(self, model, prompt, chat: bool = False, thinking: bool | None = None) -> LayerPath:
        """The path one prompt (text, or a list of token ids) is routed to. Text with chat: encoded
        with the template's thinking switch as ``thinking`` says, by default as the router's training
        sweep set it (False unless that sweep left thinking on), so it reads the tokens it trained on."""
        if thinking is None and chat:
            thinking = self.thinking
        ids = model.codec.encode_prompt(prompt, chat, thinking) if isinstance(prompt, str) else \
            [int(t) for t in prompt]
        return self.candidates[self.choose(model, [ids])[0]]

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "name": self.name, "candidates": [str(c) for c in self.candidates],
                "layer": self.layer, "pooling": self.pooling, "num_layers": self.num_layers,
                "hidden_size": self.hidden_size,
                "classifier": {"kind": self.kind, "classes": self.classes, "mean": self.mean.tolist(),
                               "scale": self.scale.tolist(), "weights": self.weights.tolist(),
                               "bias": self.bias.tolist()},
                "training": self.training, "evaluation": self.evaluation}

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> Router:
        where = source or "router"
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise RouterError(f"{where}: not a circuit-finder router (no \"format\": \"{FORMAT}\")")
        try:
            c = d["classifier"]
            return cls(name=str(d["name"]), candidates=list(d["candidates"]), layer=int(d["layer"]),
                       pooling=str(d["pooling"]), num_layers=int(d["num_layers"]), hidden_size=int(d["hidden_size"]),
                       kind=str(c["kind"]), classes=list(c["classes"]), mean=c["mean"], scale=c["scale"],
                       weights=np.asarray(c["weights"], np.float64).reshape(-1, len(c["mean"])) if c["weights"] else
                       np.zeros((0, len(c["mean"]))), bias=c["bias"], training=dict(d.get("training") or {}),
                       evaluation=d.get("evaluation"), source=source)
        except KeyError as e:
            raise RouterError(f"{where}: missing field {e}") from e
        except (TypeError, ValueError) as e:
            if isinstance(e, RouterError):
                raise
            raise RouterError(f"{where}: {e}") from e

    def save(self, path: str | Path) -> Path:
        """Writes the router as one JSON file (atomically: a killed save leaves the old file)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"  # (a NaN fails before any write)
        with atomic_file(path, "w", encoding="utf-8") as f:  # fsynced, a unique temporary name
            f.write(text)
        self.source = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Router:
        """Reads a file written by ``save`` (RouterError naming the file when it is not one)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise RouterError(f"{path}: cannot read the router file ({e.strerror or e})") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RouterError(f"{path}: not JSON ({e})") from e
        return cls.from_dict(data, source=str(path))

    def report(self) -> str:
        """What the router was trained on and how it did on held-out items, in words and numbers."""
        return reading.report(self)

    def evaluation_table(self):
        """The held-out means as a pandas table (rows: baseline, best fixed, router, oracle and
        each candidate; columns: probes and combined)."""
        return reading.evaluation_table(self)
