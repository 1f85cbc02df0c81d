"""Config composition, overrides, and load-time errors: exit code 2 and a message naming the key."""

import re
import subprocess
import sys

import pytest

from conftest import CONFIGS, DENSE_1B, TINY
from sdd_train.config import ConfigError, InitConfig, ModelConfig, RunConfig, load_config, save_config
from sdd_train.train.__main__ import main


def test_composition_and_precedence():
    cfg = load_config(TINY)
    assert cfg.model.d_model == 256 and cfg.model.block == "sdd"  # from model/tiny and block/sdd
    assert cfg.train.max_steps > 0 and cfg.name == "tiny"  # the file's own keys
    cfg = load_config(TINY, ["block=pre", "model.d_model=128", "optim.betas=[0.8,0.9]", "name=other"])
    assert cfg.model.block == "pre" and cfg.model.d_model == 128
    assert cfg.optim.betas == [0.8, 0.9] and cfg.name == "other"
    assert load_config(TINY, ["block=spannorm", "model.spannorm.residual_scale=0.5"]).model.spannorm.residual_scale == 0.5
    # a dotted override beats a group swap, whatever the order
    assert load_config(TINY, ["model.block=post", "block=pre"]).model.block == "post"


def test_every_block_file_loads():
    for path in sorted((CONFIGS / "block").glob("*.yaml")):
        assert load_config(TINY, [f"block={path.stem}"]).model.block == path.stem


def test_every_example_sweep_loads():
    """Each sweep in configs/sweeps expands into runs whose configs load (the axis values included)."""
    from sdd_train.sweeps.grid import load_sweep

    sweeps = {path.stem: load_sweep(path) for path in sorted((CONFIGS / "sweeps").glob("*.yaml"))}
    assert [r.name for r in sweeps["schedules"].runs] == ["cosine", "wsd", "linear", "inverse_sqrt"]
    assert all(s.runs for s in sweeps.values())


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DENSE_1B, ["block=deepnorm", "train.max_steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


MALFORMED = [
    (["model.d_modle=3"], "model.d_modle"),  # unknown key
    (["model.d_model=abc"], "model.d_model"),  # wrong type
    (["model.n_heads=5"], "model.n_heads"),  # d_model % n_heads
    (["model.n_kv_heads=3"], "model.n_kv_heads"),  # n_heads % n_kv_heads
    (["model.block=prenorm"], "model.block"),  # unknown scheme; message lists the allowed ones
    (["model.vocab_size=4000"], "model.vocab_size"),  # smaller than the tokenizer
    (["train.seq_len=4096"], "train.seq_len"),  # longer than max_seq_len
    (["train.global_batch_size=40"], "train.global_batch_size"),  # not a multiple of micro-batch
    (["block=nope"], "defaults"),  # no such block-scheme file
    (["optim.betas=[0.9]"], "optim.betas"),
    (["train.precision=fp16"], "train.precision"),
    (["optim.lr=-1"], "optim.lr"),
    (["model.qk_norm=sometimes"], "model.qk_norm"),
    (["train.max_steps"], "train.max_steps"),  # no '='
    (["colour=red"], "colour"),  # neither a key nor a group
    (["train.seed=-1"], "train.seed"),  # numpy's generator would refuse it at the first batch
    (["name=.."], "name"),  # the run directory would be runs/.. itself
    (["callbacks=[{path: '.relative:Cb'}]"], "callbacks.0.path"),  # a relative import
]


@pytest.mark.parametrize("overrides,key", MALFORMED, ids=[k for _, k in MALFORMED])
def test_malformed_override_exits_2_naming_key(overrides, key, capsys):
    assert main([TINY, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error:") and key in err
    assert len(err.splitlines()) == 1


def test_unknown_scheme_lists_allowed(capsys):
    main([TINY, "model.block=prenorm"])
    err = capsys.readouterr().err
    assert "deepnorm" in err and "spannorm" in err


BAD_FILES = {
    "unknown_top.yaml": ("defaults: [model/tiny]\nmodell: {d_model: 3}\n", "modell"),
    "bad_yaml.yaml": ("model: {d_model: [\n", "invalid YAML"),
    "bad_type.yaml": ("train:\n  max_steps: many\n", "train.max_steps"),
    "missing_default.yaml": ("defaults: [model/huge]\n", "model/huge"),
    "not_mapping.yaml": ("- a\n- b\n", "mapping"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_malformed_file(tmp_path, name, capsys):
    text, needle = BAD_FILES[name]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tiny.yaml").write_text((CONFIGS / "model" / "tiny.yaml").read_text())
    path = tmp_path / name
    path.write_text(text)
    assert main([str(path)]) == 2
    assert needle in capsys.readouterr().err


def test_missing_file_and_error_type(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_cli_subprocess_exit_code():
    """The installed entry point itself returns 2, with no traceback."""
    proc = subprocess.run([sys.executable, "-m", "sdd_train.train", TINY, "model.n_kv_heads=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.n_kv_heads" in proc.stderr and "Traceback" not in proc.stderr


def test_dry_run_prints_size(capsys):
    assert main([DENSE_1B, "block=pre", "--dry-run"]) == 0
    assert "1,178,707,968 total" in capsys.readouterr().out


def _choice_fields(cls, prefix=""):
    """(dotted key, allowed values) of every field declared with schema.choice, nested sections included."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if "choices" in f.metadata:
            yield prefix + f.name, f.metadata["choices"]
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            yield from _choice_fields(f.default_factory, f"{prefix}{f.name}.")


CHOICES = list(_choice_fields(RunConfig))


@pytest.mark.parametrize("key,allowed", CHOICES, ids=[k for k, _ in CHOICES])
def test_every_named_choice_is_checked_against_its_field(key, allowed):
    """Validation reads the allowed values from the schema's field, the one place they are listed."""
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: 'bogus' is not one of {re.escape(', '.join(allowed))}$"):
        load_config(TINY, [f"{key}=bogus"])


def test_allowed_values_are_listed_once():
    """No tuple or list of a key's allowed values is repeated in the package: code imports them from
    sdd_train/config/schema.py (or the model's registries)."""
    tuples = [allowed for _, allowed in CHOICES if len(allowed) > 1]
    assert len(tuples) >= 14  # (data.eval_sets.N.split, in a list, is not among them)
    found = []
    for path in sorted((CONFIGS.parent / "sdd_train").rglob("*.py")):
        text = path.read_text()
        for allowed in tuples:
            literal = r"\s*,\s*".join(f"[\"']{re.escape(v)}[\"']" for v in allowed)
            if re.search(literal, text) and path.name != "schema.py":
                found.append((path.name, allowed))
    assert not found


def test_a_model_config_built_in_code_is_checked_when_the_model_is_built():
    import torch

    from sdd_train.model import Transformer

    with torch.device("meta"), pytest.raises(ConfigError, match="model.init.scheme: 'xavier' is not one of"):
        Transformer(ModelConfig(init=InitConfig(scheme="xavier")))


def test_choices_inside_lists_are_checked():
    from sdd_train.config import EvalSetConfig
    from sdd_train.config.validation import check_choices

    cfg = RunConfig()
    cfg.data.eval_sets = [EvalSetConfig(name="w", path="p"), EvalSetConfig(name="v", path="p", split="test")]
    with pytest.raises(ConfigError, match="^data.eval_sets.1.split: 'test' is not one of val, train$"):
        check_choices(cfg)
