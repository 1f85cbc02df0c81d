"""Nothing is written before everything is checked: each bad config, data file, tokenizer or path is
one line on stderr, exit code 2, and no run directory (or prepared dataset) appears."""

from __future__ import annotations

import pytest

from conftest import TINY, small_run
from sdd_train.data.__main__ import main as data_main
from sdd_train.train.__main__ import main


def assert_one_line_exit_2(code: int, capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert needle in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("case", ["missing_dataset", "bad_eval_set", "vocab", "block", "callback", "flash"])
def test_bad_run_writes_no_run_directory(case, data_cache, tmp_path, capsys):
    run = tmp_path / "runs" / "run"
    extra, needle = {
        "missing_dataset": (["data.source=prepared", f"data.datasets=[{{path: {tmp_path}/nope}}]"], "nope"),
        "bad_eval_set": ([f"data.eval_sets=[{{name: w, path: {tmp_path}/nope}}]"], "nope"),
        "vocab": (["model.vocab_size=300"], "model.vocab_size"),
        "block": (["model.block=prenorm"], "model.block: 'prenorm' is not one of"),
        "callback": (["callbacks=[{path: 'nowhere:Cb'}]"], "callbacks.0.path"),
        # flash-attn cannot run on a CPU (nor without the package): refused, not a crash at step 1
        "flash": (["model.attention_backend=flash"], "model.attention_backend: 'flash' needs"),
    }[case]
    assert_one_line_exit_2(main(small_run(run, data_cache, *extra)), capsys, needle)
    assert not run.exists() and not run.parent.exists()


def test_run_dir_that_is_a_file(data_cache, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    assert_one_line_exit_2(main(small_run(target, data_cache)), capsys, "run_dir is a file")
    assert target.read_text() == "not a directory"
    below = target / "run"
    assert_one_line_exit_2(main(small_run(below, data_cache)), capsys, f"run_dir: {target}, a parent of {below},")


def test_empty_config_file(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing\n")
    assert_one_line_exit_2(main([str(empty), f"run_dir={tmp_path / 'run'}"]), capsys, "the config file is empty")
    assert not (tmp_path / "run").exists()


def test_unreadable_tokenizer_in_prepare(tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("some text\n")
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"\x00 not a sentencepiece model \xff" * 8)
    out = tmp_path / "out"
    code = data_main(["prepare", str(tmp_path / "doc.txt"), "--tokenizer", str(bad), "--out", str(out)])
    assert_one_line_exit_2(code, capsys, "not a readable SentencePiece model")
    assert not out.exists()


def test_dry_run_checks_the_scheme_names(capsys):
    assert_one_line_exit_2(main([TINY, "model.ffn=dense2", "--dry-run"]), capsys, "model.ffn: 'dense2' is not one of")
