"""Generation with a KV cache, the lm-eval-harness adapter, Hugging Face export."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import reference
from conftest import BLOCK_FFNS, block_overrides, small_model_cfg, small_run
from sdd_train.config import load_config
from sdd_train.eval import generate
from sdd_train.eval.generate import Sampling, generate_ids, next_token
from sdd_train.eval.inference import LoadedModel, load_model
from sdd_train.model import Transformer
from sdd_train.model.layers import rope_cache
from sdd_train.train.__main__ import main


@pytest.fixture(scope="module")
def run(data_cache, tmp_path_factory):
    """A small trained SDD run (fp32) to evaluate."""
    run_dir = tmp_path_factory.mktemp("eval_run")
    assert main(small_run(run_dir, data_cache, "train.max_steps=20", "train.precision=fp32", "train.eval_interval=0",
                          "model.block=sdd")) == 0
    return run_dir


def model_for(block: str, ffn: str = "dense") -> Transformer:
    """A small fp32 model with random gains and matrices, so its logits are O(1) and every part matters."""
    torch.manual_seed(0)
    cfg = small_model_cfg(block, ffn=ffn, max_seq_len=48)
    cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.expert_hidden = 4, 2, 16
    return reference.randomise_(Transformer(cfg)).eval()


# --------------------------------------------------------------------------- generation


def decode_with_logits(model: Transformer, prompts: list[list[int]], s: Sampling, use_cache: bool,
                       monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[int]], torch.Tensor]:
    """generate_ids' new tokens and the logits it chose each from, [steps, B, V] (recorded at next_token)."""
    steps = []

    def recording(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
        steps.append(logits.clone())
        return next_token(logits, s, generator)

    with monkeypatch.context() as m:
        m.setattr(generate, "next_token", recording)
        ids = generate_ids(model, prompts, s, use_cache=use_cache)
    return ids, torch.stack(steps)


@pytest.mark.parametrize("block,ffn", BLOCK_FFNS)
def test_kv_cache_generation_equals_full_recompute(block, ffn, monkeypatch):
    """Every decoding step's logits, with the KV cache and by full recomputation of the left-padded
    batch, equal those of the row's own unpadded sequence in one forward (fp32: up to ~5e-6 apart on
    logits of ~4; a KV cache rounded to bf16 is ~1e-2 off)."""
    model = model_for(block, ffn)
    prompts = [[5, 17, 3, 9, 22, 40, 1], [8, 2], [60, 61, 62, 63]]  # different lengths: left padding
    s = Sampling(max_new_tokens=12)
    cached, cached_logits = decode_with_logits(model, prompts, s, True, monkeypatch)
    full, full_logits = decode_with_logits(model, prompts, s, False, monkeypatch)
    assert cached == full and all(len(c) == 12 for c in cached)
    with torch.no_grad():
        for row, (prompt, new) in enumerate(zip(prompts, cached)):
            alone = model(torch.tensor([prompt + new[:-1]]))[0, len(prompt) - 1:]  # the logits of each step
            torch.testing.assert_close(cached_logits[:, row], alone, rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(full_logits[:, row], alone, rtol=2e-5, atol=2e-5)


@torch.no_grad()
def test_incremental_logits_equal_the_full_forward():
    """Chunks of several tokens into the cache, not only one at a time (fp32: ~4e-6 apart)."""
    model = model_for("sdd")
    tokens = torch.randint(0, 97, (2, 20))
    cache = model.new_cache(2, 24)
    steps = [model(tokens[:, :7], cache=cache), model(tokens[:, 7:8], cache=cache), model(tokens[:, 8:], cache=cache)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(tokens), rtol=2e-5, atol=2e-5)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert next_token(logits, Sampling(), None).item() == 3
    gen = torch.Generator().manual_seed(0)
    top2 = {next_token(logits, Sampling(temperature=1.0, top_k=2), gen).item() for _ in range(200)}
    assert top2 == {2, 3}
    # top-p 0.5: token 3 alone has p = 0.64 >= 0.5, so nothing else is ever drawn
    assert {next_token(logits, Sampling(temperature=1.0, top_p=0.5), gen).item() for _ in range(100)} == {3}


def test_sdd_generate_cli_with_stop_string(run, tmp_path, capsys):
    from sdd_train.eval.generate import main as generate_main

    assert generate_main([str(run), "--prompt", "def ", "--max-new-tokens", "20"]) == 0
    greedy = capsys.readouterr().out
    assert generate_main([str(run), "--prompt", "def ", "--max-new-tokens", "20", "--no-cache"]) == 0
    assert capsys.readouterr().out == greedy
    from sdd_train.eval.export import export

    folder = export(run, tmp_path / "export")  # a consolidated export carries its tokenizer
    assert generate_main([str(folder), "--prompt", "def ", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == greedy
    first_char = greedy[4:5] or "x"
    assert generate_main([str(run), "--prompt", "def ", "--max-new-tokens", "20", "--stop", first_char]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "def "


# --------------------------------------------------------------------------- lm-eval-harness


def direct_logprob(model: Transformer, context: list[int], continuation: list[int]) -> float:
    tokens = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(model(tokens[:, :-1]).float(), -1)[0]
    n = len(continuation)
    return sum(logprobs[len(context) - 1 + j, continuation[j]].item() for j in range(n))


def test_lm_eval_loglikelihoods_equal_a_direct_computation(run):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from sdd_train.eval.lm_eval_adapter import SDDTrainLM

    lm = SDDTrainLM(checkpoint=str(run), batch_size=3)
    pairs = [("def main():\n    return", " 0"), ("import", " os\nimport sys"), ("class A", ":"),
             ("x = [1, 2,", " 3]"), ("for i in range(10):", " print(i)")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        c, k = lm._encode_pair(ctx, cont)
        assert lp == pytest.approx(direct_logprob(lm.model, c, k), abs=1e-4)
        assert lp < 0 and isinstance(greedy, bool)
    # rolling: the whole text after an EOS, in one window when it fits
    text = "import os\nprint(os.getcwd())\n"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = lm.tok_encode(text)
    assert rolling == pytest.approx(direct_logprob(lm.model, [lm.eot_token_id], ids), abs=1e-4)
    # longer than the context: disjoint windows, each scored with up to max_length tokens
    long_text = "x = 1\n" * 40
    assert len(lm.tok_encode(long_text)) > lm.max_length
    (long_lp,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)])
    assert math.isfinite(long_lp) and long_lp < rolling
    # generation stops at the task's stop strings
    (text_out,) = lm.generate_until([Instance("generate_until", {}, ("def ", {"until": ["("], "max_gen_toks": 16}), 0)])
    assert "(" not in text_out


def test_local_multiple_choice_task_through_lm_eval(run, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("datasets")
    from lm_eval.tasks import TaskManager

    from sdd_train.eval.lm_eval_adapter import SDDTrainLM  # registers the model type

    # the likely choice second in some documents, so an answer read from the wrong choice shows
    docs = [{"question": "import", "choices": [" os", " zzzz qqq"], "answer": 0},
            {"question": "def f(x):\n    return", "choices": [" ]]]] ))))", " x"], "answer": 1},
            {"question": "class", "choices": [" Foo:", " ((((("], "answer": 0},
            {"question": "for i in", "choices": [" )))) ::", " range(10):"], "answer": 1}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(f"""task: sdd_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    tasks_here = TaskManager(include_path=str(tasks), include_defaults=False)  # lm_eval's own: the CLI's below
    results = lm_eval.simple_evaluate(model="sdd_train", model_args=f"checkpoint={run},batch_size=4",
                                      tasks=["sdd_local_mc"], task_manager=tasks_here, log_samples=True)
    samples = results["samples"]["sdd_local_mc"]
    assert len(samples) == len(docs) and all(len(s["resps"]) == 2 for s in samples)  # one loglikelihood per choice
    # the accuracy the direct loglikelihoods of each (context, choice) request imply
    lm = SDDTrainLM(checkpoint=str(run))
    correct = []
    for sample in samples:
        scores = [direct_logprob(lm.model, *lm._encode_pair(*args)) for args in sample["arguments"]]
        correct.append(max(range(len(scores)), key=scores.__getitem__) == docs[sample["doc_id"]]["answer"])
    assert results["results"]["sdd_local_mc"]["acc,none"] == pytest.approx(sum(correct) / len(docs))
    # the command line: lm_eval's CLI with the model type registered (its --device default is cuda)
    cli = subprocess.run([sys.executable, "-m", "sdd_train.eval.lm_eval_adapter", "run", "--model", "sdd_train",
                          "--model_args", f"checkpoint={run}", "--batch_size", "2", "--tasks", "sdd_local_mc",
                          "--include_path", str(tasks)], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "sdd_local_mc" in cli.stdout and "acc" in cli.stdout


# --------------------------------------------------------------------------- Hugging Face export


@pytest.fixture(scope="module")
def tokenizer(run):
    """The trained run's tokenizer, loaded once: every export writes it."""
    return load_model(run).tokenizer


@pytest.mark.parametrize("block,ffn", BLOCK_FFNS)
def test_hf_remote_code_export_matches_logits(block, ffn, run, tokenizer, tmp_path):
    """The export (random gains and matrices) gives the float64 reference's logits: 1e-4 in fp32, and
    1e-10 in float64 (with a float64 RoPE table: the one it computes is fp32), so a misplaced residual,
    gain or eps shows."""
    transformers = pytest.importorskip("transformers")
    from sdd_train.eval.hf_export import export_remote_code

    overrides = [*block_overrides(block), f"model.ffn={ffn}", "model.moe.n_experts=4", "model.moe.top_k=2",
                 "model.moe.expert_hidden=32"]
    cfg = load_config(run / "config.yaml", overrides)
    torch.manual_seed(0)
    model = reference.randomise_(Transformer(cfg.model)).eval()
    out = export_remote_code(LoadedModel(model, tokenizer, cfg, run), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24))
    state = {k: v.double() for k, v in model.state_dict().items()}
    expected = reference.transformer(tokens, state, cfg.model)
    with torch.no_grad():
        # fp32: <= 3e-5; nGPT's random stored s_q, s_k are ~sqrt(d) = 8 times their init, its scores ~64 times
        # larger than at init, the softmax that sharp, and fp32 rounding up to 2.2e-4 (the float64 check is exact)
        atol = 5e-4 if block == "ngpt" else 1e-4
        torch.testing.assert_close(hf(tokens).logits.double(), expected, rtol=0, atol=atol)
        hf.double().model.rope = rope_cache(cfg.model.max_seq_len, cfg.model.head_dim, cfg.model.rope_theta,
                                            dtype=torch.float64)
        torch.testing.assert_close(hf(tokens).logits, expected, rtol=1e-10, atol=1e-10)


def test_reordered_exports_to_native_olmo2(run, tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    from sdd_train.eval.hf_export import export_olmo2
    from sdd_train.exit_codes import UsageError

    cfg = load_config(run / "config.yaml", ["model.block=reordered"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    out = export_olmo2(LoadedModel(model, tokenizer, cfg, run), tmp_path / "olmo2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "Olmo2ForCausalLM"
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24))
    with torch.no_grad():
        assert hf(tokens).logits == pytest.approx(model(tokens), abs=1e-4)
    sdd = load_config(run / "config.yaml")
    with pytest.raises(UsageError, match="model.block is 'sdd'"):  # the command's --format, not the config
        export_olmo2(LoadedModel(Transformer(sdd.model), tokenizer, sdd, run), tmp_path / "no")
    from sdd_train.eval.hf_export import main as export_main

    assert export_main([str(run), str(tmp_path / "cli"), "--format", "olmo2"]) == 2  # the run is sdd
    assert export_main([str(run), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "modeling_sdd_train.py").is_file()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "cli"), trust_remote_code=True)
    for text in ["def main():\n    return 0", " leading space", "a  b\t\tc\n\n", "ünïcode ✓"]:
        ids = tokenizer.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids and hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == tokenizer.eos_id


# --------------------------------------------------------------------------- validation


def test_validation_with_the_fused_loss_equals_the_plain_loss():
    """train.loss_chunk_size > 0 evaluates through the fused head + loss (no full logits): same losses."""
    from sdd_train.eval.inference import LOCAL_WORLD
    from sdd_train.eval.validation import EvalSet, evaluate_sets

    torch.manual_seed(0)
    cfg = small_model_cfg("sdd")
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 2, 17))
    sets = [EvalSet("a", [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens[:2]]),
            EvalSet("b", [{"inputs": tokens[2, :, :-1], "targets": tokens[2, :, 1:]}])]
    plain = evaluate_sets(model, sets, LOCAL_WORLD)
    fused = evaluate_sets(model, sets, LOCAL_WORLD, loss_chunk=5)
    assert plain.keys() == fused.keys() and "val/b/loss" in plain
    for key, value in plain.items():
        assert fused[key] == pytest.approx(value, rel=1e-6), key


def test_in_loop_validation_equals_offline_evaluation(data_cache, tmp_path):
    from sdd_train.eval.validation import main as eval_main
    from sdd_train.diagnostics.summary import read_records

    from sdd_train.data.corpus import load_stdlib_corpus

    base = small_run(tmp_path, data_cache)
    corpus = load_stdlib_corpus(load_config(base[0], base[1:]).data, log=lambda *a: None).root
    sets = f"data.eval_sets=[{{name: heldout, path: {corpus}}}, {{name: seen, path: {corpus}, split: train}}]"
    run_dir = tmp_path / "run"
    assert main(small_run(run_dir, data_cache, "train.max_steps=6", "train.precision=fp32", "train.eval_interval=3",
                          "train.eval_batches=3", sets)) == 0
    records = [r for r in read_records(run_dir / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in records] == [3, 6]
    final = records[-1]
    # two different texts (after 6 steps the model has not memorised the seen one: their order is
    # noise, and it flipped between torch versions); val_loss is their token-weighted mean
    seen, heldout = final["val/seen/loss"], final["val/heldout/loss"]
    assert seen != heldout and min(seen, heldout) < final["val_loss"] < max(seen, heldout)
    assert final["val/heldout/ppl"] == pytest.approx(math.exp(final["val/heldout/loss"]))
    from sdd_train.eval.validation import evaluate_checkpoint

    offline = evaluate_checkpoint(run_dir)
    for key in ("val/heldout/loss", "val/seen/loss", "val_loss"):
        assert offline[key] == pytest.approx(final[key], rel=1e-6), key
    assert eval_main([str(run_dir), "--step", "6"]) == 0


def test_compiled_training_with_evaluation_does_not_recompile(data_cache, tmp_path):
    """Train and eval (no_grad, eval mode, same shape) are one block graph each: no recompilation per
    evaluation."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # graphs and recompilations are dynamo's: aot_eager counts them without generating kernels (the plain
    # loss: the fused one's softmax kernel is compiled by inductor whatever the blocks' backend)
    assert main(small_run(tmp_path, data_cache, "train.compile=true", "train.compile_backend=aot_eager",
                          "train.loss_chunk_size=0", "train.max_steps=4", "train.eval_interval=2",
                          "train.eval_batches=3", "diagnostics.activation_interval=3", "train.precision=fp32")) == 0
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
