"""Hugging Face export: ``sdd-export-hf PATH OUT [--format remote_code|olmo2]``.

``remote_code`` (every block scheme, dense and MoE) writes ``config.json``, ``model.safetensors``,
the tokenizer and ``modeling_sdd_train.py`` for ``trust_remote_code=True``. The modeling file is
generated from this package's own model source (``sdd_train/model/*`` and the model config
dataclasses), so the exported model runs the very code that trained it and needs only torch and
transformers, not sdd_train.

``olmo2`` writes the native ``Olmo2ForCausalLM`` format; it exists for the ``reordered`` scheme
with full QK-norm, a dense SwiGLU and no SDD layers, which is exactly OLMo2's architecture.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from sdd_train import config as config_module
from sdd_train.config import ConfigError, ModelConfig
from sdd_train.eval.inference import TOKENIZER_FILE, LoadedModel, load_model

MODELING_FILE = "modeling_sdd_train.py"
# In dependency order; their sdd_train imports are dropped because everything lands in one file.
MODEL_MODULES = ("sdd_train.kernels.precision", "sdd_train.kernels.rms_norm", "sdd_train.kernels.cpu_attention",
                 "sdd_train.kernels.cpu_kernels", "sdd_train.kernels.cpu_rms_norm",
                 "sdd_train.kernels.cpu_sdd_swiglu", "sdd_train.train.loss", "sdd_train.model.layers",
                 "sdd_train.model.moe", "sdd_train.model.feed_forward", "sdd_train.model.blocks",
                 "sdd_train.model.transformer")
CONFIG_CLASSES = ("InitConfig", "SpanNormConfig", "MoEConfig", "ModelConfig")

_HF_WRAPPER = '''

# ---------------------------------------------------------------------------- Hugging Face wrapper

from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402


def _model_config(d: dict) -> ModelConfig:
    d = dict(d)
    return ModelConfig(init=InitConfig(**d.pop("init", {})), spannorm=SpanNormConfig(**d.pop("spannorm", {})),
                       moe=MoEConfig(**d.pop("moe", {})), **d)


class SDDTrainConfig(PretrainedConfig):
    model_type = "sdd_train"

    def __init__(self, sdd_model: dict | None = None, **kwargs):
        self.sdd_model = sdd_model or {}
        if self.sdd_model:
            kwargs.setdefault("vocab_size", self.sdd_model["vocab_size"])
            kwargs.setdefault("hidden_size", self.sdd_model["d_model"])
            kwargs.setdefault("num_hidden_layers", self.sdd_model["n_layers"])
            kwargs.setdefault("num_attention_heads", self.sdd_model["n_heads"])
            kwargs.setdefault("max_position_embeddings", self.sdd_model["max_seq_len"])
        kwargs.setdefault("tie_word_embeddings", False)  # the head reads embed.weight itself when tied
        super().__init__(**kwargs)


class SDDTrainForCausalLM(PreTrainedModel, GenerationMixin):
    """An sdd_train Transformer; generation recomputes the full sequence each step (no HF cache)."""

    config_class = SDDTrainConfig
    base_model_prefix = "model"
    _no_split_modules = [cls.__name__ for cls in BLOCKS.values()]

    def __init__(self, config: SDDTrainConfig):
        super().__init__(config)
        self.model = Transformer(_model_config(config.sdd_model))
        self.post_init()

    def _init_weights(self, module):
        """Weights come from the checkpoint; only the RoPE table (a non-persistent buffer) is computed."""
        if isinstance(module, Transformer):
            c = module.cfg
            module.rope.copy_(rope_cache(c.max_seq_len, c.head_dim, c.rope_theta, device=module.rope.device))

    def get_input_embeddings(self):
        return self.model.embed

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        doc_ids = None
        if attention_mask is not None and not bool(attention_mask.all()):
            doc_ids = torch.where(attention_mask.bool(), 0, -1)  # keep padding out of attention
        logits = self.model(input_ids, doc_ids)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
'''


def _strip_imports(source: str) -> str:
    """Drop ``from __future__`` and every ``from sdd_train...`` import (single- or multi-line)."""
    source = re.sub(r"^from sdd_train[^\n]*\([^)]*\)\n", "", source, flags=re.M)
    source = re.sub(r"^from sdd_train[^\n]*\n", "", source, flags=re.M)
    return re.sub(r"^from __future__ import annotations\n", "", source, flags=re.M)


def modeling_source() -> str:
    """The self-contained modeling file: config dataclasses, the model modules, the HF wrapper."""
    import importlib

    parts = ['"""sdd_train model for transformers (trust_remote_code); generated by sdd-export-hf from sdd_train\'s'
             ' own source."""\n\nfrom __future__ import annotations\n\nimport hashlib\nimport math\n'
             "from dataclasses import dataclass, field\n\nimport torch\n"
             "from torch import nn\n\n# custom-op namespace unique to this module, so two loaded exports never clash\n"
             "_OPS_NS = \"sddhf_\" + hashlib.md5(__name__.encode()).hexdigest()[:10]\n"]
    for name in CONFIG_CLASSES:
        parts.append(inspect.getsource(getattr(config_module, name)))
    for module in MODEL_MODULES:
        source = inspect.getsource(importlib.import_module(module))
        source = source.replace('custom_op("sdd_train::', 'custom_op(f"{_OPS_NS}::')
        parts.append(f"# ---------------------------------------------------------------------------- {module}\n"
                     + _strip_imports(source))
    return "\n\n".join(parts) + _HF_WRAPPER


def _write_tokenizer(loaded: LoadedModel, out: Path) -> None:
    """The SentencePiece model plus the metadata transformers reads (no BOS is ever added)."""
    shutil.copyfile(loaded.tokenizer.model_file, out / TOKENIZER_FILE)
    eos = loaded.tokenizer.eos_id
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "vocab_file": TOKENIZER_FILE, "add_bos_token": False,
        "add_eos_token": False, "legacy": True, "add_prefix_space": False, "eos_token": loaded.tokenizer.sp.id_to_piece(eos),
        "model_max_length": loaded.cfg.model.max_seq_len}, indent=1))


def export_remote_code(loaded: LoadedModel, out: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / MODELING_FILE).write_text(modeling_source())
    model_cfg = asdict(loaded.cfg.model)
    config = {
        "architectures": ["SDDTrainForCausalLM"], "model_type": "sdd_train",
        "auto_map": {"AutoConfig": "modeling_sdd_train.SDDTrainConfig",
                     "AutoModelForCausalLM": "modeling_sdd_train.SDDTrainForCausalLM"},
        "sdd_model": model_cfg, "vocab_size": model_cfg["vocab_size"], "hidden_size": model_cfg["d_model"],
        "num_hidden_layers": model_cfg["n_layers"], "num_attention_heads": model_cfg["n_heads"],
        "max_position_embeddings": model_cfg["max_seq_len"], "eos_token_id": loaded.tokenizer.eos_id,
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    state = {f"model.{k}": v.detach().contiguous() for k, v in loaded.model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(loaded, out)
    return out


def olmo2_compatible(m: ModelConfig) -> str | None:
    """Why ``m`` cannot be written as Olmo2ForCausalLM, or None when it can."""
    qk = m.qk_norm if m.qk_norm != "auto" else "full"
    checks = [(m.block == "reordered", f"model.block is '{m.block}', OLMo2 is 'reordered'"),
              (qk == "full", f"model.qk_norm is '{m.qk_norm}', OLMo2 normalises all q / k features ('full')"),
              (m.ffn == "dense", "model.ffn is 'moe'; OLMo2 has a dense SwiGLU")]
    return next((why for ok, why in checks if not ok), None)


def export_olmo2(loaded: LoadedModel, out: Path) -> Path:
    from safetensors.torch import save_file

    m = loaded.cfg.model
    why = olmo2_compatible(m)
    if why is not None:
        raise ConfigError(f"--format olmo2: {why}; use --format remote_code")
    d, kv = m.d_model, m.n_kv_heads * m.head_dim
    src = {k: v.detach() for k, v in loaded.model.state_dict().items()}
    state = {"model.embed_tokens.weight": src["embed.weight"], "model.norm.weight": src["final_norm.weight"],
             "lm_head.weight": src["embed.weight" if m.tie_embeddings else "lm_head.weight"]}
    for i in range(m.n_layers):
        p, o = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = src[p + "attention.att_proj.weight"].split([d, kv, kv])
        up, gate = src[p + "feed_forward.ff_proj.weight"].chunk(2)
        state.update({
            o + "self_attn.q_proj.weight": q, o + "self_attn.k_proj.weight": k, o + "self_attn.v_proj.weight": v,
            o + "self_attn.o_proj.weight": src[p + "attention.attn_out.weight"],
            o + "self_attn.q_norm.weight": src[p + "attention.q_norm.weight"],
            o + "self_attn.k_norm.weight": src[p + "attention.k_norm.weight"],
            o + "post_attention_layernorm.weight": src[p + "attn_norm.weight"],
            o + "post_feedforward_layernorm.weight": src[p + "ff_norm.weight"],
            o + "mlp.gate_proj.weight": gate, o + "mlp.up_proj.weight": up,
            o + "mlp.down_proj.weight": src[p + "feed_forward.ff_out.weight"],
        })
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous().clone() for k, t in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = {
        "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "vocab_size": m.vocab_size,
        "hidden_size": d, "intermediate_size": m.ffn_hidden, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "attention_bias": False,
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": False,  # lm_head is written out, so both transformers 4 and 5 load it as is
        "eos_token_id": loaded.tokenizer.eos_id, "pad_token_id": None, "bos_token_id": None,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    _write_tokenizer(loaded, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdd-export-hf", description="Export a trained model for Hugging Face"
                                     " transformers.")
    parser.add_argument("path", help="run directory, checkpoint directory or sdd-export folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--format", choices=["remote_code", "olmo2"], default="remote_code")
    parser.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.path, args.step)
        exporter = export_olmo2 if args.format == "olmo2" else export_remote_code
        out = exporter(loaded, Path(args.out))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trust = ", trust_remote_code=True" if args.format == "remote_code" else ""
    print(f"exported {loaded.source} to {out}; load with AutoModelForCausalLM.from_pretrained('{out}'{trust})")
    return 0


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
