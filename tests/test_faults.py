"""Faults a long run meets: corrupt or truncated checkpoint files, a full disk during a save, a killed
process, a dead rank. Each leaves a checkpoint that loads, and the run continues exactly (bitwise) as
if nothing had happened. ``make soak`` (scripts/soak.py) repeats these many times; this is its short
version."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import small_run
from sdd_train import checkpoint
from sdd_train.checkpoint import manifest, storage
from sdd_train.checkpoint.__main__ import main as ckpt_main
from sdd_train.checkpoint.manifest import ALGORITHM, MANIFEST, file_checksum
from sdd_train.diagnostics.summary import read_records
from sdd_train.distributed.world import cpu_fsdp_supported
from sdd_train.eval.validation import main as eval_main
from sdd_train.train.callbacks import Callback
from sdd_train.train.__main__ import main

EXTRA = ["optim.warmup_steps=3", "model.block=sdd", "train.precision=fp32", "train.eval_interval=0",
         "train.checkpoint_interval=2", "diagnostics.layer_stats_interval=0", "diagnostics.activation_interval=0"]


def args(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return small_run(run_dir, cache, *EXTRA, *extra)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_records(run_dir / "events.jsonl") if e["event"] == kind]


@pytest.fixture(scope="module")
def reference(data_cache, tmp_path_factory) -> Path:
    """An uninterrupted run of 6 steps."""
    run_dir = tmp_path_factory.mktemp("reference")
    assert main(args(run_dir, data_cache, "train.max_steps=6")) == 0
    return run_dir


@pytest.fixture(scope="module")
def at_step_4(data_cache, tmp_path_factory) -> Path:
    """The same run stopped after step 4: checkpoints at steps 2 and 4 (each copied before use)."""
    run_dir = tmp_path_factory.mktemp("at_step_4")
    assert main(args(run_dir, data_cache, "train.max_steps=4")) == 0
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def test_every_checkpoint_records_the_checksum_of_every_file(at_step_4):
    for ckpt in checkpoint.complete_checkpoints(at_step_4):
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
        assert sorted(manifest["files"]) == files
        assert {"meta.json", ".metadata", "rng/rank_0.pt"} <= set(files) and any(f.endswith(".distcp") for f in files)
        for name, entry in manifest["files"].items():
            assert entry["size"] == (ckpt / name).stat().st_size
            assert entry[ALGORITHM] == file_checksum(ckpt / name)


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * 4096 + 7])
def test_a_file_checksum_is_the_hash_of_its_bytes(size, tmp_path, monkeypatch):
    """Read in chunks (made small here), a file's checksum is the library's digest of its whole
    content: another value would make every checkpoint unverifiable by other tools."""
    import hashlib

    import xxhash

    monkeypatch.setattr(manifest, "_CHUNK", 4096)
    content = random.Random(size).randbytes(size)
    (tmp_path / "f").write_bytes(content)
    assert file_checksum(tmp_path / "f", "xxh3_128") == xxhash.xxh3_128(content).hexdigest()
    assert file_checksum(tmp_path / "f", "blake2b") == hashlib.blake2b(content, digest_size=16).hexdigest()


def overwrite(path: Path, at: float = 0.5, size: int = 4096) -> None:
    """4 KiB of other bytes in place (silent disk corruption), the file's size unchanged."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + size] = bytes((b + 1) % 256 for b in data[start:start + size])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def shard(ckpt: Path) -> Path:
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


FAULTS = {
    "shard_overwritten": lambda c: overwrite(shard(c)),
    "shard_truncated": lambda c: truncate(shard(c)),
    "dcp_metadata": lambda c: overwrite(c / ".metadata", at=0.0, size=64),
    "rng_state": lambda c: truncate(c / "rng" / "rank_0.pt"),
    "meta_json": lambda c: (c / "meta.json").write_text("{ not json"),
    "manifest": lambda c: (c / MANIFEST).write_text("{ not json"),
    "shard_missing": lambda c: shard(c).unlink(),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_bitwise(fault, reference, at_step_4, data_cache,
                                                                             tmp_path, capsys):
    run = copy_of(at_step_4, tmp_path)
    bad = checkpoint.checkpoint_dir(run) / "step_0000004"
    FAULTS[fault](bad)
    assert eval_main([str(bad)]) == 2  # sdd-eval refuses it: one line, exit 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and len(err.splitlines()) == 1
    assert ckpt_main(["verify", str(run)]) == 2
    capsys.readouterr()
    assert main(args(run, data_cache, "train.max_steps=6")) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {bad} is unusable" in out and "resume: from" in out
    assert losses(run) == losses(reference)  # steps 3-6 retrained from step 2's checkpoint, bitwise
    rejected = events(run, "checkpoint_rejected")
    assert [(e["checkpoint"], e["step"]) for e in rejected] == [("step_0000004", 2)]
    assert (checkpoint.checkpoint_dir(run) / "step_0000004.corrupt").is_dir()  # kept for inspection
    assert ckpt_main(["verify", str(run)]) == 0  # what is left, and the new step 4 and 6, are intact


def test_no_usable_checkpoint_exits_2_naming_each(at_step_4, data_cache, tmp_path, capsys):
    run = copy_of(at_step_4, tmp_path)
    for ckpt in checkpoint.complete_checkpoints(run):
        overwrite(shard(ckpt))
    assert main(args(run, data_cache, "train.max_steps=6")) == 2
    err = capsys.readouterr().err.strip()
    assert "no usable checkpoint" in err and "step_0000002" in err and "step_0000004" in err
    assert len(err.splitlines()) == 1
    assert not checkpoint.complete_checkpoints(run)


def test_verification_can_be_switched_off(at_step_4, data_cache, tmp_path, capsys):
    """train.verify_checkpoints=false loads silently corrupted values as they are (and still falls back
    from a checkpoint that cannot be read)."""
    run = copy_of(at_step_4, tmp_path)
    overwrite(shard(checkpoint.checkpoint_dir(run) / "step_0000004"), at=0.9, size=8)
    assert main(args(run, data_cache, "train.max_steps=5", "train.verify_checkpoints=false")) == 0
    assert "resume: from" in capsys.readouterr().out and not events(run, "checkpoint_rejected")
    assert max(losses(run)) == 5


def test_an_unverifiable_checkpoint_that_fails_to_load_is_skipped_in_place(reference, at_step_4, data_cache, tmp_path,
                                                                           capsys):
    """Without checksums (verification off, or no manifest) a load failure may be the machine's (memory,
    a timeout) as well as the files': the checkpoint is left where it is, the one before it is used."""
    run = copy_of(at_step_4, tmp_path)
    truncate(shard(checkpoint.checkpoint_dir(run) / "step_0000004"))
    assert main(args(run, data_cache, "train.max_steps=6", "train.verify_checkpoints=false")) == 0
    assert "step_0000004 cannot be loaded" in capsys.readouterr().out
    assert [(e["checkpoint"], e["step"]) for e in events(run, "checkpoint_skipped")] == [("step_0000004", 2)]
    assert losses(run) == losses(reference) and not list(checkpoint.checkpoint_dir(run).glob("*.corrupt"))
    assert ckpt_main(["verify", str(run)]) == 0  # step 4 was written again on the way


def test_intact_files_that_fail_to_load_stop_the_resume_and_move_nothing(at_step_4, data_cache, tmp_path, capsys,
                                                                         monkeypatch):
    """Verified files that still fail to load (here: the machine runs out of memory) are not damaged."""
    run = copy_of(at_step_4, tmp_path)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("cannot allocate 4 GiB")

    monkeypatch.setattr(storage.dcp, "load", out_of_memory)
    assert main(args(run, data_cache, "train.max_steps=6")) == 2
    err = capsys.readouterr().err.strip()
    assert "its files are intact, but" in err and "MemoryError: cannot allocate 4 GiB" in err
    assert len(err.splitlines()) == 1
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step_0000002", "step_0000004"]


def test_a_changed_model_config_stops_the_resume_and_moves_nothing(at_step_4, data_cache, tmp_path, capsys):
    """Resuming with another model is the command's mistake, not the checkpoints': exit 2 naming the key,
    every checkpoint and config.yaml left as they were, and the original command then resumes as if the
    mistake had not happened (bitwise)."""
    untouched = copy_of(at_step_4, tmp_path / "untouched")
    assert main(args(untouched, data_cache, "train.max_steps=6")) == 0
    run = copy_of(at_step_4, tmp_path)

    def files() -> dict[str, bytes]:
        return {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    before = files()
    assert main(args(run, data_cache, "train.max_steps=6", "model.n_layers=3")) == 2
    err = capsys.readouterr().err.strip()
    assert "step_0000004" in err and "model.n_layers: 2 -> 3" in err and len(err.splitlines()) == 1
    assert files() == before  # checkpoints, config.yaml and logs as they were
    assert main(args(run, data_cache, "train.max_steps=6")) == 0
    assert losses(run) == losses(untouched) and max(losses(run)) == 6


def test_a_model_with_fewer_tensors_than_the_checkpoint_is_refused(at_step_4, data_cache, tmp_path, capsys):
    """DCP loads a model that lacks some of the checkpoint's tensors (fewer layers) without a word: the
    tensors are compared first, and the resume stops (exit 2) naming one that has no place."""
    run = copy_of(at_step_4, tmp_path)
    assert main(args(run, data_cache, "train.max_steps=6", "model.n_layers=1")) == 2
    err = capsys.readouterr().err.strip()
    assert "blocks.1." in err and "in the checkpoint, not in this model" in err and "model.n_layers: 2 -> 1" in err
    assert not list(checkpoint.checkpoint_dir(run).glob("*.corrupt"))


def test_a_model_change_with_the_same_tensors_is_refused_unless_allowed(at_step_4, data_cache, tmp_path, capsys):
    """rope_theta changes the math but no tensor: a resume stops (exit 2, the key named, nothing written)
    unless train.allow_model_change says so; then the change is a warning and an events.jsonl record, and
    a kernel choice (model.attention_backend) is never a change of the model."""
    run = copy_of(at_step_4, tmp_path)
    before = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(args(run, data_cache, "train.max_steps=5", "model.rope_theta=20000")) == 2
    err = capsys.readouterr().err.strip()
    assert "model.rope_theta: 10000.0 -> 20000.0" in err and "train.allow_model_change" in err
    assert len(err.splitlines()) == 1
    assert {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main(args(run, data_cache, "train.max_steps=5", "model.rope_theta=20000",
                     "train.allow_model_change=true", "model.attention_backend=sdpa")) == 0
    out = capsys.readouterr().out
    assert "written with another model config (model.rope_theta: 10000.0 -> 20000.0, model.attention_backend" in out
    changed = events(run, "model_changed")
    assert len(changed) == 1 and changed[0]["changes"][0] == "model.rope_theta: 10000.0 -> 20000.0"
    # Each checkpoint is rebuilt as the model it was trained as, whatever the run's config.yaml says now.
    from sdd_train.config import load_config
    from sdd_train.eval.export import export
    from sdd_train.eval.inference import load_model
    assert load_config(run / "config.yaml").model.rope_theta == 20000
    for step, theta in ((4, 10000), (5, 20000)):
        assert load_config(export(run, tmp_path / f"export_{step}", step) / "config.yaml").model.rope_theta == theta
        assert load_model(run, step).cfg.model.rope_theta == theta
        assert load_model(tmp_path / f"export_{step}").cfg.model.rope_theta == theta


def test_an_unreadable_file_is_a_verification_problem(at_step_4, tmp_path, monkeypatch):
    """A read error (EIO from a failing disk) marks the checkpoint corrupt instead of crashing the resume."""
    run = copy_of(at_step_4, tmp_path)
    ckpt = checkpoint.checkpoint_dir(run) / "step_0000004"
    real = manifest.file_checksum

    def failing(path, algorithm=manifest.ALGORITHM):
        if Path(path).name == "meta.json":
            raise OSError(errno.EIO, "Input/output error")
        return real(path, algorithm)

    monkeypatch.setattr(manifest, "file_checksum", failing)
    assert checkpoint.verify_checkpoint(ckpt) == ["meta.json: unreadable (Input/output error)"]


class CrashAt(Callback):
    """Raises before the given step: the run ends as a crash does, between log steps."""

    name = "crash_at"

    def __init__(self, step: int) -> None:
        self.step = step

    def pre_step(self, trainer, step: int) -> None:
        if step == self.step:
            raise RuntimeError("planted crash")


def test_a_resume_between_log_steps_logs_what_an_uninterrupted_run_logs(data_cache, tmp_path, monkeypatch):
    """Callback state that spans log steps (the largest gradient norm since the last record) is in the
    checkpoint: crashed at step 4, resumed from step 2, with records at 1, 4 and 6, step 4's record is the
    uninterrupted run's (its largest norm is step 2's)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(args(whole, data_cache, "train.max_steps=6", "train.log_interval=4")) == 0
    with pytest.raises(RuntimeError, match="planted crash"):
        main(args(parts, data_cache, "train.max_steps=6", "train.log_interval=4",
                  "callbacks=[{path: 'test_faults:CrashAt', options: {step: 4}}]"))
    assert main(args(parts, data_cache, "train.max_steps=6", "train.log_interval=4")) == 0
    records = [[{k: r[k] for k in ("step", "loss", "grad_norm", "grad_norm_max")}
                for r in read_records(run / "metrics.jsonl") if "grad_norm_max" in r] for run in (whole, parts)]
    assert [r["step"] for r in records[0]] == [1, 4, 6] and records[1] == records[0]


def test_latest_is_the_newest_complete_checkpoint_by_step(tmp_path):
    """Not the marker (a kill between a rename and the marker's move leaves it one behind), and not the
    name's order (step numbers outgrow the zero padding)."""
    root = checkpoint.checkpoint_dir(tmp_path)
    for step in (9_999_999, 10_000_000):
        (root / f"step_{step:07d}").mkdir(parents=True)
        (root / f"step_{step:07d}" / "meta.json").write_text(json.dumps({"step": step}))
    (root / "latest").write_text("step_9999999")
    assert checkpoint.latest(tmp_path).name == "step_10000000"
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_9999999", "step_10000000"]


def test_sdd_ckpt_lists_steps_tokens_sizes_and_status(at_step_4, tmp_path, capsys):
    run = copy_of(at_step_4, tmp_path)
    overwrite(shard(checkpoint.checkpoint_dir(run) / "step_0000002"))
    truncate(shard(checkpoint.checkpoint_dir(run) / "step_0000004"))
    assert ckpt_main(["list", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["checkpoint", "step", "tokens", "size", "status"]
    two, four = lines[1].split(), lines[2].split()
    assert two[:4] == ["step_0000002", "2", "1,024", two[3]] and "complete" in lines[1]  # sizes alone: intact
    assert four[:3] == ["step_0000004", "4", "2,048"] and "CORRUPT" in lines[2] and "(latest)" in lines[2]
    assert ckpt_main(["verify", str(checkpoint.checkpoint_dir(run) / "step_0000002")]) == 2
    assert "checksum differs" in capsys.readouterr().out
    assert ckpt_main(["verify", str(tmp_path / "nowhere")]) == 2
    (checkpoint.checkpoint_dir(run) / "step_0000002" / "meta.json").write_bytes(b"\xff{ not json")
    capsys.readouterr()
    assert ckpt_main(["list", str(run)]) == 0
    assert "CORRUPT (meta.json unreadable)" in capsys.readouterr().out.splitlines()[1]


# --------------------------------------------------------------------------- a save that fails


def fail_writes_at(monkeypatch, save_number: int, exc: OSError):
    """Make the checkpoint writes of the ``save_number``-th save raise ``exc`` (a full disk, a quota)."""
    real, calls = storage.dcp.save, []

    def save(*a, **kw):
        calls.append(1)
        if len(calls) == save_number:
            raise exc
        return real(*a, **kw)

    monkeypatch.setattr(storage.dcp, "save", save)


@pytest.mark.parametrize("policy", ["stop", "retry"])
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(policy, reference, data_cache, tmp_path, monkeypatch,
                                                                 capsys):
    run = tmp_path / "run"
    fail_writes_at(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    code = main(args(run, data_cache, "train.max_steps=6", f"train.checkpoint_failure={policy}"))
    captured = capsys.readouterr()
    assert not list(checkpoint.checkpoint_dir(run).glob("*.partial"))  # nothing half-written stays
    if policy == "stop":
        assert code == 1
        assert "checkpoint of step 4 not saved" in captured.err and "No space left" in captured.err
        assert len(captured.err.strip().splitlines()) == 1
        assert checkpoint.latest(run).name == "step_0000002"
        monkeypatch.undo()
        assert main(args(run, data_cache, "train.max_steps=6")) == 0  # space again: resume from step 2
    else:
        assert code == 0
        assert [e["step"] for e in events(run, "checkpoint_failed")] == [4]
        assert "saving again at the next interval" in captured.out
        assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step_0000002", "step_0000006"]
    assert losses(run) == losses(reference)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 3 MiB tmpfs (root only): the run's checkpoints (~1.2 MiB each) fill it up."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({result.stderr.strip() or 'not root'}); "
                    "the injected ENOSPC test covers the same path")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_filesystem(small_filesystem, reference, data_cache, capsys):
    """A checkpoint every step until the filesystem is full: the saves that do not fit fail cleanly."""
    run = small_filesystem / "run"
    code = main(args(run, data_cache, "train.max_steps=6", "train.keep_checkpoints=100",
                     "train.checkpoint_failure=retry", "train.checkpoint_interval=1"))
    failed = events(run, "checkpoint_failed") if (run / "events.jsonl").is_file() else []
    if code == 0:
        assert failed, "the filesystem never filled up: make it smaller"
    else:  # the last step's save cannot be retried
        assert code == 1 and "No space left" in capsys.readouterr().err
    assert not list(checkpoint.checkpoint_dir(run).glob("*.partial"))
    for ckpt in checkpoint.complete_checkpoints(run):
        assert checkpoint.verify_checkpoint(ckpt) == []  # every checkpoint that was completed is intact
    good = {s: v for s, v in losses(run).items()}
    assert good == {s: losses(reference)[s] for s in good}


# --------------------------------------------------------------------------- killed processes


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step} (exit {proc.poll()})")


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_killed_at_random_moments_resumes_bitwise(data_cache, tmp_path):
    """SIGKILL at two random moments of the run (mid-step, mid-save or mid-log: wherever it lands),
    then re-run to the end: every logged loss equals the uninterrupted run's (run with the same
    thread count: on torch 2.11 one thread and two give other last bits). With Muon, whose momentum
    buffers are checkpointed beside AdamW's moments (it updates the matrices, AdamW the rest): the
    AdamW-only resumes are the tests above and test_distributed's signal tests."""
    run, uninterrupted = tmp_path / "run", tmp_path / "uninterrupted"
    cmd = [sys.executable, "-m", "sdd_train.train", *args(run, data_cache, "train.max_steps=6",
                                                           "train.checkpoint_interval=1", "optim.name=muon")]
    assert subprocess.run([*cmd, f"run_dir={uninterrupted}"], env=ENV, capture_output=True, timeout=300).returncode == 0
    rng = random.Random(0)
    for step in (2, 4):
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_step(run, proc, step)
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere in the next step or its checkpoint
        proc.kill()
        proc.wait()
    assert subprocess.run(cmd, env=ENV, capture_output=True, timeout=300).returncode == 0
    assert losses(run) == losses(uninterrupted) and max(losses(run)) == 6
    assert ckpt_main(["verify", str(run)]) == 0


def test_a_stop_signal_before_the_first_step_stops_the_run_cleanly(data_cache, tmp_path, monkeypatch, capsys):
    """SIGUSR1 while the run is being set up (here: as its data is opened) does not kill the process (the
    signal's default action): the run stops before step 1 with exit 0, and re-running trains it. A caller
    in the same process (``make matrix``) tells the stopped run from the finished one by STOPS.received."""
    from sdd_train.train import launch
    from sdd_train.train.stop_signals import STOPS

    open_data = launch.open_run_data

    def preempted_while_opening(*a, **k):
        os.kill(os.getpid(), signal.SIGUSR1)
        return open_data(*a, **k)

    monkeypatch.setattr(launch, "open_run_data", preempted_while_opening)
    assert main(args(tmp_path, data_cache, "train.max_steps=2")) == 0
    assert "stopped by SIGUSR1 before step 1" in capsys.readouterr().out
    assert losses(tmp_path) == {} and STOPS.received == signal.SIGUSR1
    monkeypatch.setattr(launch, "open_run_data", open_data)
    assert main(args(tmp_path, data_cache, "train.max_steps=2")) == 0
    assert sorted(losses(tmp_path)) == [1, 2] and STOPS.received == 0
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the command restored the handlers


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


@pytest.mark.skipif(not cpu_fsdp_supported(), reason="FSDP2 on CPU needs torch >= 2.7")
def test_a_dead_rank_ends_the_job_and_the_rerun_resumes_bitwise(data_cache, tmp_path):
    """SIGKILL one of two workers mid-run: torchrun ends the job at once (the survivor does not wait
    out the collective timeout), and re-running resumes from the last checkpoint to the same losses."""
    run, clean = tmp_path / "run", tmp_path / "clean"
    extra = ["train.max_steps=8", "train.checkpoint_interval=2", "train.micro_batch_size=2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "sdd_train.train"]
    env = {**ENV, "SDD_TRAIN_DIST_TIMEOUT": "600"}
    assert subprocess.run([*torchrun, *args(clean, data_cache, *extra)], env=env, capture_output=True,
                          timeout=600).returncode == 0
    proc = subprocess.Popen([*torchrun, *args(run, data_cache, *extra)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_step(run, proc, 3)
        workers = children(proc.pid)
        assert len(workers) == 2
        killed_at = time.time()
        os.kill(workers[1], signal.SIGKILL)
        code = proc.wait(timeout=120)
        assert code != 0 and time.time() - killed_at < 60  # far from the 600 s collective timeout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert checkpoint.latest(run) is not None
    result = subprocess.run([*torchrun, *args(run, data_cache, *extra)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(run) == losses(clean)
    assert ckpt_main(["verify", str(run)]) == 0


def test_finite_weights_in_every_kept_checkpoint(reference):
    for ckpt in checkpoint.complete_checkpoints(reference):
        assert all(torch.isfinite(v).all() for v in checkpoint.read_model_state(ckpt).values())
