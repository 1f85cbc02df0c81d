"""The feature matrix's CI subset: every pair of settings in at least one combination, each run for a few
steps and checked against its reference (tests/matrix.py; ``make matrix`` runs every combination)."""

from __future__ import annotations

from pathlib import Path

import pytest

import matrix
import matrix_run
from matrix import AXES, NA, Combo

PRODUCT = matrix.full_product()
CI = matrix.ci_universe(PRODUCT)
SUBSET = matrix.ci_subset(PRODUCT)
RUNS = matrix.with_references(SUBSET)


def test_the_product_holds_each_meaningful_combination_once():
    assert len(set(PRODUCT)) == len(PRODUCT)
    assert all((c["ffn"] == "moe") == (c["grouped_mm"] != NA) for c in PRODUCT)
    assert all((c["ffn"] == "moe" and c.world > 1) == (c["ep"] != NA) for c in PRODUCT)
    dense = sum(c["ffn"] == "dense" for c in PRODUCT)  # per world size: moe has 2 grouped_mm (and 2 ep on 2+ ranks)
    assert len(PRODUCT) == dense + dense // 3 * (2 + 4 + 4) == 6656
    assert len({c.name for c in PRODUCT}) == len(PRODUCT)
    # the names of combinations from before the ep axis are unchanged (docs/matrix/results.jsonl holds them)
    assert matrix.make(ffn="moe", world="2").name == "moe-pre-gmmauto-eager-acnone-nodoc-fsdp2-fp32-p32-plain-noz"


def test_references_differ_only_in_what_they_compare():
    for combo in PRODUCT:
        ref = matrix.reference(combo)
        if ref is None:
            assert matrix.refusal(combo) or (combo["ac"], combo["compile"], combo["world"]) == ("none", "off", "1")
            continue
        other, kind = ref
        assert other in PRODUCT
        changed = {axis for axis in AXES if other[axis] != combo[axis]} - {"ep"}  # one process has no ep
        assert changed == ({"ac"} if kind == "ac" else {{"compile": "compile", "ranks": "world"}[k]
                                                           for k in kind.split("+")})
        assert other["ep"] == combo["ep"] or (kind != "ac" and other.world == 1)


def matrix_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("matrix_script", Path(__file__).parents[1] / "scripts" / "matrix.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_shards_split_the_product_each_with_its_references():
    """``make matrix MATRIX_ARGS=--shard I/N``: N disjoint parts that make up the product, each closed under
    the references its combinations are compared with (so N matrices can run at once into one WORK)."""
    script = matrix_script()
    shards = [script.select("full", [], f"{i}/3") for i in range(3)]
    assert sum(map(len, shards)) == len(PRODUCT) and set().union(*map(set, shards)) == set(PRODUCT)
    assert max(map(len, shards)) - min(map(len, shards)) <= len(PRODUCT) / 20  # roughly even
    for shard in shards:
        assert set(matrix.with_references(shard)) == set(shard)
    with pytest.raises(script.UsageError, match="--shard 3/3"):
        script.select("full", [], "3/3")


def test_a_matrix_resumed_elsewhere_reruns_the_references_it_compares_with(tmp_path, monkeypatch):
    """results.jsonl is committed and run directories are not: a combination still to run whose reference's
    row came from another clone, other code or another CPU gets that reference run again here (a reference that
    crashed on this code stays as it is); a row that failed on other code runs again."""
    script = matrix_script()
    here, before = {"commit": "abc1234", "cpu": "EPYC"}, {"commit": "0ld0000", "cpu": "EPYC"}
    monkeypatch.setitem(script.RUN_ON, "cpu", "EPYC")
    monkeypatch.setattr(script, "same_code", lambda recorded: recorded == "abc1234")
    acfull = matrix.make(ac="full", compile="on")
    compiled, root = matrix.make(compile="on"), matrix.make()
    ok = matrix_run.Outcome("ok", 1.0)
    loaded = {c.name: (None, ok, here) for c in (compiled, root)}
    lost = dict(loaded)
    script.forget_stale_rows(matrix.with_references([acfull]), lost, tmp_path)
    assert lost == {}  # acfull's reference, and that one's
    for c in (compiled, root):
        (tmp_path / c.name).mkdir()
        (tmp_path / c.name / "metrics.jsonl").touch()
    kept = dict(loaded)
    script.forget_stale_rows(matrix.with_references([acfull]), kept, tmp_path)
    assert kept == loaded
    older = {compiled.name: (None, ok, before), root.name: (None, ok, here)}
    script.forget_stale_rows(matrix.with_references([acfull]), older, tmp_path)
    assert list(older) == [root.name]  # the compiled reference ran at another commit
    crashed = {compiled.name: (None, matrix_run.Outcome("fail", 1.0), here)}
    script.forget_stale_rows([acfull], crashed, tmp_path)
    assert list(crashed) == [compiled.name]
    failed = matrix_run.Row(acfull, "fail", 1.0, "ac: " + compiled.name, matrix_run.Diff(1e-7, 1e-7), "")
    rows = {acfull.name: (failed, ok, before), **{c.name: (None, ok, here) for c in (compiled, root)}}
    script.forget_stale_rows(matrix.with_references([acfull]), rows, tmp_path)
    assert acfull.name not in rows and compiled.name in rows  # runs again, against this commit's reference
    rows = {acfull.name: (failed, ok, here)}
    script.forget_stale_rows([acfull], rows, tmp_path)
    assert acfull.name in rows  # failed on this code: running it again would fail again
    elsewhere = {c.name: (None, ok, {**here, "cpu": "Xeon"}) for c in (compiled, root)}
    script.forget_stale_rows(matrix.with_references([acfull]), elsewhere, tmp_path)
    assert elsewhere == {}


def test_a_row_counts_as_this_code_only_where_the_code_it_ran_is_unchanged():
    script = matrix_script()
    first = script.git("rev-list", "--max-parents=0", "HEAD").stdout.split()
    if not first or script.git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        pytest.skip("needs the repository's history")
    assert not script.same_code(first[0])  # the first commit had none of this code
    assert not script.same_code(first[0] + "+") and not script.same_code("") and not script.same_code("0ld0000")
    last = script.git("log", "-1", "--format=%h", "--", *script.CODE).stdout.strip()  # last commit touching it
    clean = not script.git("status", "--porcelain", "--untracked-files=no", "--", *script.CODE).stdout.strip()
    assert script.same_code(last) == clean


def test_the_subset_covers_every_pair_of_settings():
    assert matrix.missing_pairs(SUBSET, PRODUCT) == set()
    # the check can fail: every row the greedy took covered a pair no earlier row (or its references) did
    assert matrix.missing_pairs(matrix.with_references(SUBSET[:-1]), PRODUCT)
    cheap = matrix.pairwise(CI)
    assert matrix.missing_pairs(cheap, CI) == set() and matrix.missing_pairs(cheap, PRODUCT)
    assert matrix.missing_pairs(PRODUCT[:8], PRODUCT)
    ran_cheap = set(matrix.with_references(cheap))
    costly = [c for c in RUNS if c not in ran_cheap]
    assert costly and all(c.world == 4 or (c["compile"] == "on" and c.world > 1) for c in costly)
    assert len(SUBSET) <= 50 and matrix.ci_subset(PRODUCT) == SUBSET  # a few dozen of 6656, and deterministic
    full = matrix.pairwise(PRODUCT)  # make matrix --subset pairwise: every pair of the whole product
    assert matrix.missing_pairs(full, PRODUCT) == set()
    # each refusal once, for its exit 2
    assert [why for why, _ in matrix.REFUSALS] == [matrix.refusal(c) for c in SUBSET if matrix.refusal(c)]


def test_make_matrix_runs_every_three_settings_together_first():
    """``make matrix`` runs a 3-wise covering before the rest of the product, so a matrix stopped early has
    tried every three settings together; what a resumed matrix already ran counts, and is not run again."""
    script = matrix_script()
    triples = matrix.covering(PRODUCT, 3)
    assert matrix.missing_pairs(triples, PRODUCT, 3) == set()
    assert matrix.missing_pairs(triples[:-1], PRODUCT, 3)  # the check can fail
    assert len(triples) <= 150  # of 6656
    order = script.select("full", [])
    assert order[:len(triples)] == triples and len(order) == len(PRODUCT) and set(order) == set(PRODUCT)
    ran = frozenset(triples[:40])
    rest = matrix.covering(PRODUCT, 3, ran)
    assert not ran & set(rest) and matrix.missing_pairs([*ran, *rest], PRODUCT, 3) == set()


def test_a_refusal_is_exit_2_with_one_line():
    one = "config error: train.global_batch_size: 8 is not a multiple of ..."
    assert matrix_run.judge_exit(2, one + "\n", 1.0).status == "refused"
    assert matrix_run.judge_exit(2, one + "\n" + one + "\n", 1.0).status == "fail"
    assert matrix_run.judge_exit(2, "Traceback (most recent call last):\n" + one, 1.0).status == "fail"
    crash = matrix_run.judge_exit(1, "Traceback (most recent call last):\n  File x\nRuntimeError: boom\n", 1.0)
    assert (crash.status, crash.error) == ("fail", "exit 1: RuntimeError: boom")
    # under torchrun (its own output as torch 2.13 prints it when both workers exit 2)
    report = ("E1203 09:18:50.996000 13478 .venv/lib/python3.11/site-packages/torch/distributed/elastic/"
              "multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 0 (pid: 13602) of binary: python\n"
              "Traceback (most recent call last):\n  File run.py\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
              "  exitcode  : 2 (pid: 13603) \n  exitcode  : 2 (pid: 13602) \n")
    assert matrix_run.judge_torchrun(1, one + "\n" + report, 1.0).status == "refused"
    segfault = matrix_run.judge_torchrun(1, report.replace(": 2 (pid: 13603)", ": -11 (pid: 13603)"), 1.0)
    assert segfault.status == "fail"
    worker = matrix_run.judge_torchrun(1, "[rank1]: Traceback\n[rank1]: ValueError: bad\n" + report, 1.0)
    assert (worker.status, worker.error) == ("fail", "exit 2: ValueError: bad")


@pytest.fixture(scope="module")
def runner(data_cache, tmp_path_factory) -> matrix_run.Runner:
    """Compiled combinations compile with aot_eager here: a feature that breaks dynamo or AOT autograd
    breaks there too, without the minutes inductor spends generating and building C++ for each.
    ``make matrix`` compiles every one with inductor, and test_backends.py checks inductor's numerics."""
    return matrix_run.Runner(tmp_path_factory.mktemp("matrix"), data_cache, in_process=True,
                             compile_backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("combo", RUNS, ids=lambda c: c.name)
def test_combination(combo: Combo, runner: matrix_run.Runner):
    """Runs, and agrees with its reference (AC bitwise; compiled and multi-rank runs within the measured
    tolerances), or, where tests/matrix.py's REFUSALS say so, is refused at start-up with exit 2 and one line."""
    runner.prefetch([c for c in RUNS if c.world == combo.world])  # one torchrun launch for them all
    row = runner.row(combo)
    print(matrix_run.format_row(row))  # the largest differences, in the log (pytest -rP)
    assert row.status == ("refused" if matrix.refusal(combo) else "pass"), matrix_run.format_row(row)


@pytest.mark.slow
def test_compiled_blocks_recompute_with_their_own_graphs_under_expert_parallelism(runner: matrix_run.Runner):
    """With parallel.ep=2 the compiled MoE blocks break at the all-to-all; full and selective activation
    checkpointing must still recompute with the compiled graphs, so the run is bitwise the one without
    checkpointing (dynamo running the checkpoint eagerly inside the block recomputed with eager kernels).
    CI's subset compiles on one process only, where blocks are one graph."""
    without = matrix.make(ffn="moe", compile="on", world="2", ep="on")
    combos = [without, without.replace(ac="full"), without.replace(ac="selective")]
    runner.prefetch(combos)
    for combo in combos[1:]:
        row = runner.row(combo)
        assert row.reference == f"ac: {without.name}" and row.status == "pass", matrix_run.format_row(row)
        assert (row.diff.steps, row.diff.weights) == (0.0, 0.0), matrix_run.format_row(row)


@pytest.mark.slow
def test_the_comparison_finds_a_small_difference(runner: matrix_run.Runner):
    """Runs that differ only by the z-loss term (weight 1e-3) fail both the bitwise and the fp32 check."""
    with_z = matrix.make(loss="chunked", z_loss="on")
    without = with_z.replace(z_loss="off")
    assert runner.row(with_z).status == runner.row(without).status == "pass"
    for kind in ("ac", "ranks"):
        row = matrix_run.verdict(with_z, runner.outcomes[with_z], runner.work / with_z.name, (without, kind),
                                 runner.outcomes[without], runner.work / without.name)
        assert row.status == "fail" and 0 < row.diff.steps < 0.1, matrix_run.format_row(row)


def test_run_directories_are_named_after_the_combination():
    combo = matrix.make(ffn="moe", grouped_mm="loop", compile="on", world="4", z_loss="on")
    assert combo.name == "moe-pre-gmmloop-compiled-acnone-nodoc-hsdp2x2-fp32-p32-plain-z"
    assert Path(combo.name).name == combo.name
    assert "parallel.dp_replicate=2" in combo.overrides() and "optim.z_loss=1e-3" in combo.overrides()
