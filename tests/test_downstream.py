"""Downstream evaluation (sdd_train/eval/downstream.py): OLMo's tasks scored in the loop and offline."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, small_run
from sdd_train.config import ConfigError, load_config
from sdd_train.diagnostics.summary import read_records
from sdd_train.eval import downstream
from sdd_train.eval.downstream import DownstreamTask, Request, task_metrics
from sdd_train.train.__main__ import main

TASKS = ["openbook_qa", "copa"]  # a len_norm task and an acc one, the two quickest to tokenise
DOWNSTREAM = [f"downstream.tasks=[{','.join(TASKS)}]", "downstream.limit=6", "train.max_steps=4",
              "train.eval_interval=2", "train.checkpoint_interval=2", "train.precision=fp32"]


def _request(doc: int, choice: int, label: int, chars: int, nbytes: int | None = None) -> Request:
    return Request(doc, choice, label, (1, 2), 1, (2, 3), chars, nbytes or chars)


def test_metrics_follow_olmo_definitions():
    """acc ranks raw sums, len_norm sums per character; ce_loss / bpb are the correct choice's per char / byte."""
    # doc 0: raw picks choice 0 (label 1), per character picks choice 1 (longer, less negative per char)
    # doc 1: both pick choice 1 = label
    reqs = [_request(0, 0, 1, 2), _request(0, 1, 1, 10, 12), _request(1, 0, 1, 5), _request(1, 1, 1, 5)]
    scores = [-2.0, -3.0, -9.0, -1.0]
    out = task_metrics(DownstreamTask("t", "len_norm", reqs, 0), scores)
    assert out["downstream/t/acc"] == 0.5 and out["downstream/t/len_norm"] == 1.0
    assert out["downstream/t"] == out["downstream/t/len_norm"]
    assert out["downstream/t/ce_loss"] == pytest.approx((3.0 / 10 + 1.0 / 5) / 2)
    assert out["downstream/t/bpb"] == pytest.approx((3.0 / 12 + 1.0 / 5) / 2 / math.log(2))
    assert task_metrics(DownstreamTask("t", "acc", reqs, 0), scores)["downstream/t"] == 0.5
    # a perplexity task scores its one continuation; f1 counts choice 0 as the positive class
    ppl = task_metrics(DownstreamTask("p", "ce_loss", [_request(0, 0, 0, 4)], 0), [-2.0])
    bits = pytest.approx(0.5 / math.log(2))
    assert ppl == {"downstream/p": 0.5, "downstream/p/ce_loss": 0.5, "downstream/p/bpb": bits}
    f1 = task_metrics(DownstreamTask("f", "f1", reqs, 0), scores)  # preds [0, 1], labels [1, 1]: no true positive
    assert f1["downstream/f"] == 0.0


def test_the_console_line_shows_each_tasks_primary_metric():
    from sdd_train.train.callbacks.run_log import format_line

    record = {"step": 2, "downstream/piqa": 0.5, "downstream/piqa/acc": 0.25, "downstream/copa": 0.625}
    assert format_line(record, 4) == "step 2/4 | piqa 0.500 | copa 0.625"


def test_an_unknown_task_or_a_missing_extra_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="downstream.tasks: 'piqaa' is not one of ai2-olmo-eval's tasks"):
        downstream.check_tasks(["piqaa"])
    monkeypatch.setitem(sys.modules, "olmo_eval.tasks", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"sdd_train\[downstream\]"):
        downstream.check_tasks(["piqa"])
    downstream.check_tasks([])  # no task asked for: the extra is not needed


def test_a_bad_downstream_config_fails_before_anything_is_written(data_cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(small_run(run_dir, data_cache, "downstream.tasks=[no_such_task]")) == 2
    assert not run_dir.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "downstream.tasks: 'no_such_task'" in err[0]
    with pytest.raises(ConfigError, match="downstream.limit: must be >= 0"):
        load_config(TINY, ["downstream.limit=-1"])


@pytest.fixture(scope="module")
def run(data_cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("downstream") / "run"
    assert main(small_run(run_dir, data_cache, *DOWNSTREAM)) == 0
    return run_dir


def test_the_loop_logs_every_task_and_sdd_eval_reproduces_it(run):
    """At steps 2 and 4 every task's metrics are logged; the step-2 checkpoint evaluated offline gives the same
    numbers, exactly (same machine, same batches)."""
    from sdd_train.eval.validation import evaluate_checkpoint_downstream, main as eval_main

    logged = {r["step"]: r for r in read_records(run / "metrics.jsonl") if "downstream/copa" in r}
    assert sorted(logged) == [2, 4]
    for task in TASKS:
        for metric in ("", "/acc", "/len_norm", "/ce_loss", "/bpb"):
            assert math.isfinite(logged[4][f"downstream/{task}{metric}"]), (task, metric)
    assert logged[2]["downstream/openbook_qa"] == logged[2]["downstream/openbook_qa/len_norm"]
    assert logged[2]["downstream/copa"] == logged[2]["downstream/copa/acc"]
    offline = evaluate_checkpoint_downstream(run, step=2)
    assert offline == {k: v for k, v in logged[2].items() if k.startswith("downstream/")}
    assert eval_main([str(run), "--step", "2", "--downstream", "copa", "--limit", "3"]) == 0


def test_the_run_report_plots_each_task_against_tokens(run, tmp_path):
    from sdd_train.diagnostics.report import run_report, tokens_per_step

    assert tokens_per_step(run) == 8 * 64  # SMALL_RUN: 8 sequences of 64 tokens a step
    text = run_report(run, tmp_path).read_text()
    assert "![Downstream tasks" in text and (tmp_path / "downstream.png").stat().st_size > 10_000


def test_scores_equal_log_likelihoods_computed_directly(run):
    """Each choice's score is the float64 sum of its continuation's log-probabilities, computed here one
    request at a time from the whole sequence (the continuation is its last tokens, wherever the context ends): an
    off-by-one in the scored span, the batching or the padding changes them, and the accuracies."""
    from sdd_train.eval.inference import LOCAL_WORLD, load_model

    loaded = load_model(run)
    task = downstream.build_tasks(loaded.cfg, loaded.tokenizer, ["openbook_qa"], limit=4)[0]
    assert task.n_docs + task.left_out == 4 and task.n_docs >= 3 and len(task.requests) == 4 * task.n_docs
    scores = downstream.score_requests(loaded.model, task.requests, LOCAL_WORLD, batch_size=3,
                                       seq_len=loaded.cfg.train.seq_len, compiled=False, pad=task.pad)
    model = loaded.model.double()
    direct = []
    for r in task.requests:
        sequence = list(r.tokens) + [r.continuation[-1]]
        assert tuple(sequence[-len(r.continuation):]) == r.continuation
        # the logits of every position but the last: those of the request's tokens (causal attention)
        logp = torch.log_softmax(model(torch.tensor([sequence[:-1]]))[0], dim=-1)
        n = len(sequence)
        direct.append(sum(logp[n - len(r.continuation) - 1 + j, t].item() for j, t in enumerate(r.continuation)))
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), torch.tensor(direct, dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)
    want, got = task_metrics(task, direct), task_metrics(task, scores)
    assert got["downstream/openbook_qa/acc"] == want["downstream/openbook_qa/acc"]
    assert got["downstream/openbook_qa/len_norm"] == want["downstream/openbook_qa/len_norm"]
