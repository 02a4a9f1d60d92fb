"""lm-evaluation-harness adapter: ``circuit-finder`` as an lm_eval model, along any layer path.

    import circuit_finder.lm_eval   # registers the model name "circuit-finder"
    import lm_eval
    lm_eval.simple_evaluate(model="circuit-finder",
                            model_args="pretrained=default,layers=rys=10:13,dtype=float32",
                            tasks=["arc_easy"])

or from the shell: ``circuit-finder eval --model PATH --layers 0..12+10..29 --tasks arc_easy``.

model_args: ``pretrained`` (HF folder, .gguf file or ``default``), ``layers`` (any layer path
text; lm-eval splits model_args on commas, so write ``0..12+10..29`` or ``0..12;10..29`` or the
RYS short form ``rys=10:13``), ``device``, ``dtype``, ``batch_size``, ``max_length``,
``max_gen_toks``, ``add_bos_token``.

Scoring follows lm-eval's conventions for causal models (those of its Hugging Face backend):
contexts and continuations are encoded together and split, contexts are left-truncated to the
maximum length, greedy generation stops at ``until`` strings and the EOS token.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

__all__ = ["CircuitFinderLM"]

_FALSE = ("0", "false", "no", "none", "")


def _flag(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() not in _FALSE


@register_model("circuit-finder", "circuit_finder")
class CircuitFinderLM(TemplateLM):
    """An lm_eval LM running a circuit-finder Model along one layer path."""

    def __init__(self, pretrained: str = "default", layers: str | None = None, device: str = "cpu",
                 dtype: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | str | None = None, model=None, **kwargs):
        super().__init__()
        import circuit_finder as cf

        if kwargs:
            raise ValueError(f"unknown circuit-finder model_args: {', '.join(sorted(kwargs))}")
        self.cf_model = model if model is not None else cf.load(pretrained, device=device, dtype=dtype)
        if self.cf_model.tokenizer is None:
            raise ValueError(f"{pretrained}: lm-eval needs a tokenizer, and this model has none")
        self.tokenizer = self.cf_model.tokenizer
        self.path = self.cf_model.path(layers if layers not in (None, "") else None)
        self.pretrained = str(pretrained)
        self._batch_size = 1 if str(batch_size).startswith("auto") else max(1, int(batch_size))
        config = self.cf_model.config.raw
        self._max_length = int(max_length) if max_length else int(config.get("max_position_embeddings") or 2048)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _flag(add_bos_token)

    # --------------------------------------------------------------------- lm-eval plumbing
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.cf_model.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__") or "circuit-finder"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = {}
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def get_model_info(self) -> dict:
        return {"model": self.pretrained, "layers": str(self.path), "slots": len(self.path),
                "dtype": str(self.cf_model.dtype), "device": str(self.cf_model.device)}

    # --------------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        model = self.cf_model
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="circuit-finder loglikelihood")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            seqs, conts = [], []
            for i in chunk:
                _, context_enc, continuation_enc = requests[i]
                if not context_enc or not continuation_enc:
                    raise ValueError(f"request {i}: empty context or continuation after tokenization")
                seqs.append((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
                conts.append(continuation_enc)
            ids, mask = model._left_pad(seqs)
            with torch.inference_mode():
                logits = model.logits(ids, layers=self.path, attention_mask=mask)
            width = ids.shape[1]
            for row, (i, cont) in enumerate(zip(chunk, conts)):
                n = len(cont)
                logp = torch.log_softmax(logits[row, width - n:].float(), dim=-1)
                target = torch.tensor(cont, device=logp.device)
                greedy = bool((logp.argmax(-1) == target).all())
                value = float(logp.gather(-1, target.unsqueeze(-1)).sum())
                results[i] = (value, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="circuit-finder rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(v for v, _ in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # --------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        model = self.cf_model
        args = [r.args for r in requests]
        results: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="circuit-finder generate_until")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(args[members[0]][1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0
            top_p = float(kwargs.get("top_p", 1.0) or 1.0)
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {max_gen} leaves no room for the context in {self.max_length} tokens")
            members = sorted(members, key=lambda i: -len(self.tok_encode(args[i][0])))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                seqs = [self.tok_encode(args[i][0], left_truncate_len=max_ctx) for i in chunk]
                ids, mask = model._left_pad(seqs)
                new = model._generate_ids(ids, mask, self.path, max_gen, 0, temperature, top_p, None, until,
                                          text_mode=True)
                for i, row in zip(chunk, new.tolist()):
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    text = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                bar.update(len(chunk))
        bar.close()
        return results
