"""The Hugging Face modeling file is generated from an explicit list of definitions, without rewriting
any source: an import added to a model file does not reach it, the file runs without sdd_train, and
the generator refuses to write a file that uses a name it does not define."""

from __future__ import annotations

import ast
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sdd_train import kernels
from sdd_train.kernels import cross_entropy, triton_rms_norm
from sdd_train.eval import hf_export

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: load the modeling file with every sdd_train import refused, build each
# block scheme (dense and MoE) from the same state dict as the package's model, compare logits.
CHECK = textwrap.dedent('''
    import importlib.util, sys
    import torch
    from sdd_train.model import Transformer
    from sdd_train.config import ModelConfig, MoEConfig
    modeling = sys.argv[1]
    cases = []
    for ffn in ("dense", "moe"):
        for block in ("pre", "post", "deepnorm", "reordered", "sdd", "sdd_pre", "spannorm"):
            cfg = ModelConfig(block=block, ffn=ffn, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                              vocab_size=97, max_seq_len=32, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16))
            torch.manual_seed(0)
            model = Transformer(cfg).eval()
            tokens = torch.randint(0, 97, (2, 11))
            with torch.no_grad():
                cases.append((cfg, model.state_dict(), tokens, model(tokens)))
    for name in [m for m in sys.modules if m.split(".")[0] == "sdd_train"]:
        del sys.modules[name]

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "sdd_train":
                raise ImportError("the exported file imported " + name)

    sys.meta_path.insert(0, Refuse())
    spec = importlib.util.spec_from_file_location("exported_modeling", modeling)
    exported = importlib.util.module_from_spec(spec)
    sys.modules["exported_modeling"] = exported
    spec.loader.exec_module(exported)
    for cfg, state, tokens, expected in cases:
        d = {k: v for k, v in vars(cfg).items() if k not in ("init", "spannorm", "moe")}
        copy = exported.Transformer(exported.ModelConfig(**d, moe=exported.MoEConfig(**vars(cfg.moe)))).eval()
        copy.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(copy(tokens), expected, rtol=1e-4, atol=1e-5)
    print("ok", len(cases))
''')


def generate(package_root: Path, out: Path) -> None:
    code = f"from sdd_train.eval.hf_export import modeling_source; open({str(out)!r}, 'w').write(modeling_source())"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(package_root)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_an_unrelated_import_in_a_model_file_does_not_reach_the_export(tmp_path):
    pytest.importorskip("transformers")
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "sdd_train", copy / "sdd_train", ignore=shutil.ignore_patterns("__pycache__"))
    layers = copy / "sdd_train" / "model" / "layers.py"
    source = layers.read_text()
    anchor = "import torch\n"
    layers.write_text(source.replace(anchor, "import json  # noqa: F401\nimport sdd_train.data.tokenizer as"
                                             " unrelated  # noqa: F401\n" + anchor, 1))
    modeling = tmp_path / "modeling_sdd_train.py"
    generate(copy, modeling)
    assert "unrelated" not in modeling.read_text()
    result = subprocess.run([sys.executable, "-c", CHECK, str(modeling)], env={**os.environ, "PYTHONPATH": str(copy)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "14"]


def test_the_generator_refuses_an_undefined_name(monkeypatch):
    trimmed = tuple((m, tuple(n for n in names if n != "rms_norm_torch") if names else names)
                    for m, names in hf_export.DEFINITIONS)
    monkeypatch.setattr(hf_export, "DEFINITIONS", trimmed)
    with pytest.raises(ValueError, match="undefined names: rms_norm_torch"):
        hf_export.modeling_source()


def test_the_kernel_bindings_have_the_dispatchers_signatures():
    namespace: dict = {}
    exec(hf_export.BINDINGS, namespace)
    for name in ("rms_norm", "sdd_swiglu", "causal_attention", "attention_mask", "expert_mm", "linear_cross_entropy"):
        bound = inspect.signature(namespace[name])
        function = getattr(kernels, name)
        dispatcher = inspect.signature(getattr(function, "_init_fn", function))  # a custom op: its Python function
        assert list(bound.parameters) == list(dispatcher.parameters), name
        for p in bound.parameters.values():
            assert p.default == dispatcher.parameters[p.name].default, (name, p.name)


def test_generated_file_runs_the_package_model_definitions():
    """Every top-level definition of the model modules is in the file, as it stands in the package."""
    source = hf_export.modeling_source()
    from sdd_train.model import blocks, layers

    for obj in (layers.Attention, layers.SDDLinear, blocks.SDDBlock, blocks.register):
        assert inspect.getsource(obj) in source
    assert torch.__name__ in source


# Underscore names the file may hold: transformers' own API (PreTrainedModel hooks), and '_' itself.
TRANSFORMERS_NAMES = {"_", "_init_weights", "_no_split_modules"}


def test_the_file_names_no_private_definition():
    """Our kernels reach the file through public, documented definitions only: no ``_name`` of sdd_train
    is defined, read or called there."""
    tree = ast.parse(hf_export.modeling_source())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    private = {n for n in names if n.startswith("_") and not n.startswith("__")} - TRANSFORMERS_NAMES
    assert not private


@pytest.mark.parametrize("module,name", [(cross_entropy, "_CPU_BLOCK_ELEMENTS"),  # private
                                         (triton_rms_norm, "triton_available")])  # no docstring
def test_the_generator_refuses_a_private_or_undocumented_kernel(monkeypatch, module, name):
    monkeypatch.setattr(hf_export, "DEFINITIONS", (*hf_export.DEFINITIONS, (module, (name,))))
    with pytest.raises(ValueError, match=f"{name}: the Hugging Face modeling file copies public, documented"):
        hf_export.modeling_source()
