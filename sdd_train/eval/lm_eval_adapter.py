"""lm-evaluation-harness model type ``sdd_train`` (needs the optional ``lm-eval`` package).

Command line (``sdd-lm-eval`` is ``lm_eval`` with this model type registered)::

    sdd-lm-eval run --model sdd_train --model_args checkpoint=RUN_DIR --batch_size 16 --tasks hellaswag

Python::

    import lm_eval, sdd_train.eval.lm_eval_adapter  # registers "sdd_train"
    lm_eval.simple_evaluate(model="sdd_train", model_args="checkpoint=RUN_DIR", tasks=[...])

``checkpoint`` is a run directory (latest checkpoint, or ``step=N``), a checkpoint directory or an
``sdd-export`` folder. Requests are scored in batches of similar length (right-padded; causal
attention keeps padding out of the scored positions); inputs longer than the model's context keep
their last ``max_length`` tokens.
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  (fill the registry first, so the built-in model types stay available)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from sdd_train.eval.generate import Sampling, complete
from sdd_train.eval.inference import load_model
from sdd_train.exit_codes import UsageError, report_usage_error


@register_model("sdd_train")
class SDDTrainLM(TemplateLM):
    def __init__(self, checkpoint: str, step: int | None = None, batch_size: int | str = 8, device: str = "cpu",
                 max_length: int | None = None, **kwargs) -> None:
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm_eval's CLI passes --device cuda by default
        loaded = load_model(checkpoint, int(step) if step is not None else None, device)
        self.model, self.tok, self._device = loaded.model, loaded.tokenizer, torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_length = min(int(max_length or loaded.cfg.model.max_seq_len), loaded.cfg.model.max_seq_len)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)  # the tokenizer adds no BOS / EOS

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) per pair."""
        items = []
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError("an empty continuation cannot be scored")
            if len(continuation) > self.max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
            whole = (context + continuation)[-(self.max_length + 1):]
            items.append((i, whole[:-1], continuation))
        items.sort(key=lambda x: -len(x[1]))  # similar lengths share a batch
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            width = max(len(inp) for _, inp, _ in batch)
            tokens = torch.zeros(len(batch), width, dtype=torch.long, device=self._device)
            for row, (_, inp, _) in enumerate(batch):
                tokens[row, :len(inp)] = torch.tensor(inp, device=self._device)
            logprobs = F.log_softmax(self.model(tokens).float(), dim=-1)
            for row, (i, inp, cont) in enumerate(batch):
                n = len(cont)
                lp = logprobs[row, len(inp) - n:len(inp)]
                target = torch.tensor(cont, device=self._device)
                results[i] = (lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self.score([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text, in disjoint windows of up to max_length tokens (EOS first)."""
        out = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1)]
            out.append(sum(lp for lp, _ in self.score(windows)))
        return out

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations, cut at the task's ``until`` strings."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or [self.tok.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            s = Sampling(max_new_tokens=int(kwargs.pop("max_gen_toks", 256)),
                         temperature=float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0,
                         top_k=int(kwargs.pop("top_k", 0) or 0), top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                         stop=until)
            s.max_new_tokens = min(s.max_new_tokens, self.max_length - 1)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                texts = complete(self.model, self.tok, [requests[i].args[0] for i in chunk], s)
                for i, text in zip(chunk, texts):
                    out[i] = text
        return out  # type: ignore[return-value]


def main_cli() -> None:
    """``sdd-lm-eval``: the lm_eval command line with the ``sdd_train`` model type registered. A checkpoint
    or config that cannot be used is one line and exit code 2, as in every sdd_train command."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    try:
        cli_evaluate()
    except UsageError as e:
        sys.exit(report_usage_error(e))


if __name__ == "__main__":
    main_cli()
