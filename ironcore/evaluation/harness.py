"""lm-evaluation-harness on IronCore checkpoints, without converting them: the ``ironcore`` lm-eval model.

::

    lm_eval --model ironcore --model_args checkpoint=runs/my_run --tasks hellaswag   # with ironcore[eval]
    ironcore eval --checkpoint runs/my_run --lm-eval hellaswag,arc_easy

:class:`IronCoreLM` is an ``lm_eval`` model over an IronCore checkpoint, a run
folder (its latest checkpoint) or an HF folder, with the tokenizer saved
beside the weights. It is a ``TemplateLM``, so lm-eval itself tokenizes
context/continuation pairs exactly as for its ``hf`` model; the numbers come
from IronCore:

- ``loglikelihood``: :func:`ironcore.evaluation.likelihood.loglikelihoods`,
  each context shared by several continuations (a question's choices)
  encoded once;
- ``loglikelihood_rolling``: lm-eval's disjoint windows of the model's
  length over the text, scored the same way (the perplexity tasks);
- ``generate_until``: :func:`ironcore.inference.generate` (greedy, or sampled
  with the request's temperature), stopped once every row holds a stop
  string, cut at the first one, as lm-eval's ``hf`` model does.

Each request type shows a tqdm progress bar, as the ``hf`` model's do, unless
lm-eval passes ``disable_tqdm``.

Importing this module registers the model under ``ironcore``; the ``lm_eval``
command imports it through the ``ironcore-lm-eval.pth`` hook the package
installs (it waits until lm-eval's model registry is loaded).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.errors import ConfigError
from ironcore.evaluation.tasks import complete, load_for_eval, loglikelihoods_in_steps, prefix_token
from ironcore.models.transformer import TransformerModel


@register_model("ironcore")
class IronCoreLM(TemplateLM):
    """An lm-eval model whose numbers come from an IronCore checkpoint (see the module doc)."""

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", batch_size: int | str = 16,
                 max_gen_toks: int = 256, loaded: tuple[TransformerModel, Tokenizer] | None = None,
                 **_: Any) -> None:  # fmt: skip
        """``checkpoint``: a folder to load; or ``loaded``: a model and its tokenizer in hand (``ironcore eval``)."""
        super().__init__()
        if device.startswith("cuda") and not torch.cuda.is_available():  # lm_eval's default, as its hf model
            device = "cpu"
        if loaded is None and checkpoint is None:
            raise ValueError("IronCoreLM needs checkpoint=FOLDER (--model_args checkpoint=...)")
        self.model, self.tokenizer_ = loaded or load_for_eval(checkpoint, device)
        self.batch_size = 16 if batch_size in ("auto", None) else int(str(batch_size).split(":")[0])
        self.max_gen_toks = max_gen_toks
        self.max_length = self.model.config.max_position_embeddings
        eos = self.tokenizer_.special_tokens.get("eos_token")
        self._eot = self.tokenizer_.backend.token_to_id(eos) if eos else self.tokenizer_.eod_id
        self._prefix = prefix_token(self.tokenizer_)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> IronCoreLM:
        """``lm_eval --model ironcore --model_args ARGS [--batch_size N] [--device D]``: lm-eval passes its
        ``--batch_size`` and ``--device`` (set or default) beside ``--model_args``; a key given in both is taken
        from ``--model_args`` (the documented ``checkpoint=DIR,batch_size=16``), never given twice."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> IronCoreLM:
        """As :meth:`create_from_arg_string`, for model arguments given as a dict (``simple_evaluate``)."""
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        return cls(**{**extra, **arg_dict})

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        return self.tokenizer_.backend.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer_.decode(ids, skip_special_tokens=False)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        """``requests``: ((context, continuation), context ids, continuation ids), from lm-eval's tokenization."""
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
            results = loglikelihoods_in_steps(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size,
                                              bar.update)  # fmt: skip
        for (key, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, over lm-eval's disjoint windows of the model's length."""
        windows, owners = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            rolling = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                         prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)  # fmt: skip
            for context, continuation in map(lm_utils.make_disjoint_window, rolling):
                windows.append((context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        with tqdm(total=len(windows), disable=disable_tqdm, desc="Running loglikelihood_rolling windows") as bar:
            scored = loglikelihoods_in_steps(self.model, windows, self.batch_size, bar.update)
        for owner, (logprob, _) in zip(owners, scored, strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each request's generation (greedy unless it asks for sampling), cut at its first stop string."""
        eos = self.tok_decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}  # requests with the same generation settings run in batches together
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = kwargs.pop("max_gen_toks")
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            contexts = [self.tok_encode(requests[i].args[0])[-(self.max_length - budget) :] for i in members]
            texts = complete(self.model, self.tokenizer_, contexts, budget, until, temperature, 0, self.batch_size,
                             bar.update)  # fmt: skip
            for i, text in zip(members, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.close()
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template applied to ``chat_history`` (``--apply_chat_template``)."""
        return self.tokenizer_.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_.identity[:16]

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer_.chat_template if chat_template else None


def run_lm_eval(lm: IronCoreLM, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                logged: dict[str, list[dict]] | None = None, chat: bool = False, system: str | None = None
                ) -> dict[str, dict[str, float]]:  # fmt: skip
    """lm-eval's tasks on ``lm``: {task: {metric: value}}, lm-eval's "acc,none" named "acc" (a filter other
    than none is kept: "exact_match_strict-match"), the standard errors as "acc_stderr". ``logged``, when
    given, receives lm-eval's own per-item log (``log_samples``) of each task, made JSON-safe as lm-eval
    writes it. ``chat``: lm-eval's ``apply_chat_template`` (with ``system`` as its ``system_instruction``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's own tasks takes seconds (thousands of files): tasks all found in include_path skip it.
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not all(manager.match_tasks([task]) for task in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise ConfigError(f"--lm-eval: no lm-eval task named {', '.join(unknown)}"
                          + (f" (nor in --include-path {include_path})" if include_path else ""))  # fmt: skip
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=logged is not None,
                          apply_chat_template=chat, system_instruction=system)  # fmt: skip
    for task, items in (out.get("samples") or {}).items() if logged is not None else ():
        logged[task] = json.loads(json.dumps(items, default=lm_utils.handle_non_serializable))
    return {task: {name.replace(",none", "").replace(",", "_"): float(value) for name, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for task, metrics in out["results"].items()}  # fmt: skip
