"""The feature matrix (issue #29): the settings a user combines, every combination of them that means
something, a pairwise covering subset for CI, and which run each is checked against and how closely.
tests/matrix_run.py runs them; tests/test_matrix.py runs the subset, scripts/matrix.py (``make matrix``)
all of them.

Block schemes: ``pre`` and ``sdd`` stand for every scheme. What compile, activation checkpointing,
FSDP2 and the kernels see is the layer type (plain linears and SwiGLU; SDD layers, the fused SDD
SwiGLU and SDD experts), and these two schemes cover both; the other schemes only compose the same
layers in another order, which tests/test_blocks.py checks against float64 for each.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

NA = "-"  # an axis that does not apply to a combination

# Each axis with its values; the first value is the base a reference run goes back to.
AXES: dict[str, tuple[str, ...]] = {
    "ffn": ("dense", "moe"),
    "block": ("pre", "sdd"),
    "grouped_mm": ("auto", "loop"),  # MoE expert GEMMs: torch._grouped_mm (CPU from torch 2.9) or a loop
    "compile": ("off", "on"),
    "ac": ("none", "full", "every_n", "selective"),
    "doc_mask": ("off", "on"),
    "world": ("1", "2", "4"),  # 1 process, 2-rank FSDP2, 4-rank HSDP (2 replicas x 2 shards)
    "precision": ("fp32", "bf16"),  # bf16: autocast over fp32 parameters
    "param_dtype": ("fp32", "bf16"),  # bf16: FSDP2 gathers and computes with bf16 copies (one process too)
    "loss": ("plain", "chunked"),  # train.loss_chunk_size 0 (logits, then the loss) or the fused chunked loss
    "z_loss": ("off", "on"),  # the logits z-loss term, in whichever loss path
    "ep": ("off", "on"),  # MoE on 2+ ranks: experts split over the 2 shard ranks (parallel.ep=2)
}
AXIS_INDEX = {axis: i for i, axis in enumerate(AXES)}

# Combinations left out of the product because they mean nothing, each with why.
PRUNES = [
    "grouped_mm applies to MoE only: a dense model carries '-' there (one combination, not two identical ones)",
    "ep splits an MoE's experts over ranks: a dense model, or one process, carries '-' there",
]
# Combinations the code must refuse at start-up (exit 2, one line), each with why. They stay in the
# product and run, but cover no pair: the pairwise subset takes them once each, for the refusal.
REFUSALS = [
    ("bf16 parameters under fp32 compute (parallel.param_dtype=bf16, train.precision=fp32)",
     lambda c: c["param_dtype"] == "bf16" and c["precision"] == "fp32"),
]

# What each axis value sets, on top of BASE_OVERRIDES.
OVERRIDES: dict[tuple[str, str], list[str]] = {
    ("ffn", "dense"): ["model.ffn=dense"],
    ("ffn", "moe"): ["model.ffn=moe", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32"],
    ("block", "pre"): ["model.block=pre"],
    ("block", "sdd"): ["model.block=sdd"],
    ("grouped_mm", "auto"): ["model.moe.grouped_mm=auto"],
    ("grouped_mm", "loop"): ["model.moe.grouped_mm=loop"],
    ("grouped_mm", NA): [],
    ("compile", "off"): ["train.compile=false"],
    ("compile", "on"): ["train.compile=true"],
    ("ac", "none"): ["parallel.activation_checkpointing=none"],
    ("ac", "full"): ["parallel.activation_checkpointing=full"],
    ("ac", "every_n"): ["parallel.activation_checkpointing=every_n", "parallel.ac_every=2"],
    ("ac", "selective"): ["parallel.activation_checkpointing=selective"],
    ("doc_mask", "off"): ["data.doc_mask=false"],
    ("doc_mask", "on"): ["data.doc_mask=true"],
    ("world", "1"): [],
    ("world", "2"): [],
    ("world", "4"): ["parallel.dp_replicate=2"],
    ("precision", "fp32"): ["train.precision=fp32"],
    ("precision", "bf16"): ["train.precision=bf16"],
    ("param_dtype", "fp32"): ["parallel.param_dtype=fp32"],
    ("param_dtype", "bf16"): ["parallel.param_dtype=bf16"],
    ("loss", "plain"): ["train.loss_chunk_size=0"],
    ("loss", "chunked"): ["train.loss_chunk_size=64"],  # two chunks per micro-batch of 2 x 64 tokens
    ("z_loss", "off"): ["optim.z_loss=0"],
    ("z_loss", "on"): ["optim.z_loss=1e-3"],
    ("ep", "off"): [],
    ("ep", "on"): ["parallel.ep=2"],  # 2 ranks: both; HSDP 2 x 2: the 2 ranks of each replica
    ("ep", NA): [],
}
# 3 steps of a 2-layer model; 8 sequences a step, so 1, 2 and 4 ranks run whole micro-batches of 2.
STEPS = 3
BASE_OVERRIDES = ["model.n_layers=2", "train.micro_batch_size=2", "train.global_batch_size=8",
                  f"train.max_steps={STEPS}", "train.eval_interval=0", "train.checkpoint_interval=0",
                  "diagnostics.layer_stats_interval=0", "diagnostics.activation_interval=0"]
NAMES = {"param_dtype": {"fp32": "p32", "bf16": "p16"}, "compile": {"off": "eager", "on": "compiled"}, "world": {"1": "1p", "2": "fsdp2", "4": "hsdp2x2"},
         "doc_mask": {"off": "nodoc", "on": "doc"}, "z_loss": {"off": "noz", "on": "z"},
         "ep": {"off": "", "on": "ep2"}}  # "": left out of the name (the names from before the axis stay)


@dataclass(frozen=True)
class Combo:
    values: tuple[str, ...]  # in the order of AXES

    def __getitem__(self, axis: str) -> str:
        return self.values[AXIS_INDEX[axis]]

    def replace(self, **changes: str) -> Combo:
        return Combo(tuple(changes.get(axis, value) for axis, value in zip(AXES, self.values)))

    @property
    def name(self) -> str:
        """A short name that is also a directory name, e.g. moe-sdd-gmmloop-compiled-acfull-doc-fsdp2-bf16-chunked-z."""
        parts = []
        for axis, value in zip(AXES, self.values):
            if value == NA:
                continue
            prefix = {"grouped_mm": "gmm", "ac": "ac"}.get(axis, "")
            parts.append(NAMES.get(axis, {}).get(value, prefix + value.replace("_", "")))
        return "-".join(part for part in parts if part)

    @property
    def world(self) -> int:
        return int(self["world"])

    def overrides(self) -> list[str]:
        return BASE_OVERRIDES + [o for axis, value in zip(AXES, self.values) for o in OVERRIDES[axis, value]]


def make(**values: str) -> Combo:
    """A combination from axis=value pairs; unnamed axes take their base value, and axes that do not apply
    (PRUNES) '-'."""
    combo = Combo(tuple(values.get(axis, choices[0]) for axis, choices in AXES.items()))
    return normalised(combo)


def normalised(combo: Combo) -> Combo:
    """``combo`` with '-' on the axes that do not apply to it (PRUNES), their base value where they do."""
    moe = combo["ffn"] == "moe"
    gmm = combo["grouped_mm"] if moe and combo["grouped_mm"] != NA else (AXES["grouped_mm"][0] if moe else NA)
    ep = combo["ep"] if moe and combo.world > 1 and combo["ep"] != NA else (AXES["ep"][0] if moe and combo.world > 1 else NA)
    return combo.replace(grouped_mm=gmm, ep=ep)


def full_product() -> list[Combo]:
    """Every combination that means something (see PRUNES), in a fixed order."""
    return list(dict.fromkeys(normalised(Combo(values)) for values in itertools.product(*AXES.values())))


# ---- references: which run a combination must agree with, and how closely


def refusal(combo: Combo) -> str | None:
    """Why the code must refuse this combination, or None."""
    return next((why for why, applies in REFUSALS if applies(combo)), None)


def reference(combo: Combo) -> tuple[Combo, str] | None:
    """The combination this one is checked against and the kind of comparison: activation checkpointing
    against none with everything else equal ('ac', bitwise); otherwise compiled and multi-rank runs
    against eager on one process ('compile', 'ranks' or 'compile+ranks', measured tolerances). A
    refusal has none."""
    if refusal(combo):
        return None
    if combo["ac"] != "none":
        return combo.replace(ac="none"), "ac"
    kinds = [kind for kind, differs in (("compile", combo["compile"] == "on"), ("ranks", combo.world > 1)) if differs]
    return (normalised(combo.replace(compile="off", world="1")), "+".join(kinds)) if kinds else None


def root(combo: Combo) -> Combo:
    """The eager one-process run without activation checkpointing that ``combo``'s references lead to."""
    return normalised(combo.replace(ac="none", compile="off", world="1"))


def with_references(combos: list[Combo]) -> list[Combo]:
    """``combos`` and the runs they are compared with, each reference before the combinations that need it."""
    ordered: list[Combo] = []

    def add(combo: Combo) -> None:
        if combo in ordered:
            return
        ref = reference(combo)
        if ref:
            add(ref[0])
        ordered.append(combo)

    for combo in combos:
        add(combo)
    return ordered


# ---- covering subsets: every pair (CI) or every triple (the order make matrix runs in) of settings

Interaction = tuple[tuple[int, str], ...]  # (axis index, value) for each of 2 or 3 axes


def interactions(combo: Combo, strength: int = 2) -> set[Interaction]:
    """The settings of ``strength`` axes together that a combination exercises ('-' values exercise nothing)."""
    return set(itertools.combinations([(i, v) for i, v in enumerate(combo.values) if v != NA], strength))


def missing_pairs(chosen: list[Combo], universe: list[Combo], strength: int = 2) -> set[Interaction]:
    """Pairs (or triples) some combination of ``universe`` exercises that no combination of ``chosen`` does
    (a refused combination exercises nothing)."""
    def exercised(combos: list[Combo]) -> set[Interaction]:
        return set().union(*(interactions(c, strength) for c in combos if not refusal(c)))
    return exercised(universe) - exercised(chosen)


# Rough costs in eager one-process runs on 2 CPU cores: torchrun starts and imports every rank, and
# inductor generates and builds the compiled blocks' code in every rank.
EAGER_COST = {1: 1, 2: 4, 4: 7}
COMPILE_COST = {1: 10, 2: 20, 4: 40}


def cost(combo: Combo) -> float:
    return EAGER_COST[combo.world] + (COMPILE_COST[combo.world] if combo["compile"] == "on" else 0)


def ci_universe(product: list[Combo]) -> list[Combo]:
    """The cheap part of the product, which CI's subset covers pairwise first: compiled runs on one process
    only, and 1 or 2 ranks. Compiling in every rank of a torchrun, and 4 processes on 2 cores, cost much
    more per run, so ``ci_subset`` adds only the few of those the remaining pairs need."""
    return [c for c in product if c["world"] != "4" and (c["compile"] == "off" or c["world"] == "1")]


def ci_subset(product: list[Combo]) -> list[Combo]:
    """CI's subset: every pair of settings of the whole product in at least one combination. The cheap
    universe (``ci_universe``) covers most pairs; the few it cannot (4-rank HSDP with each setting, compile
    with 2 and 4 ranks) are then covered by as few of the costly runs as the greedy finds."""
    cheap = pairwise(ci_universe(product))
    return cheap + covering(product, 2, ran=frozenset(with_references(cheap)))


def pairwise(universe: list[Combo]) -> list[Combo]:
    """CI's subset: every pair of settings of ``universe`` in at least one combination."""
    return covering(universe, 2)


def covering(universe: list[Combo], strength: int, ran: frozenset[Combo] = frozenset()) -> list[Combo]:
    """A deterministic greedy covering: one combination for each refusal, then, until every pair (or triple,
    ``strength``) of settings is exercised, the combination that covers the most missing ones per unit of
    cost (its own and that of references not yet run); ties go to the earlier combination in ``universe``.
    What ``ran`` (combinations already run: a resumed matrix) and each chosen one's references exercise is
    covered, and what ran costs nothing."""
    runnable = [c for c in universe if not refusal(c)]
    exercised = {combo: interactions(combo, strength) for combo in runnable}
    bit = {t: 1 << i for i, t in enumerate(sorted(set().union(*exercised.values())))}
    covers = {combo: sum(bit[t] for t in ts) for combo, ts in exercised.items()}
    closures = {combo: with_references([combo]) for combo in runnable}
    unpaid = {combo: sum(map(cost, closure)) for combo, closure in closures.items()}  # of what has not run
    paid_by: dict[Combo, list[Combo]] = {}  # the combinations whose closure holds each run
    for combo, closure in closures.items():
        for c in closure:
            paid_by.setdefault(c, []).append(combo)
    need = sum(bit.values())  # the missing interactions as a bit set

    def run(combo: Combo) -> None:
        nonlocal need
        need &= ~covers.get(combo, 0)
        for other in paid_by.pop(combo, []):
            unpaid[other] -= cost(combo)

    for combo in ran:
        run(combo)
    chosen = [c for c in (next(c for c in universe if applies(c)) for _, applies in REFUSALS
                          if any(map(applies, universe))) if c not in ran]
    while need:
        def score(combo: Combo) -> float:
            gain = (covers[combo] & need).bit_count()
            return gain and gain / unpaid[combo]  # a combination with a gain has not run: its own cost is unpaid
        best = max(runnable, key=score)  # max keeps the first of equal scores
        chosen.append(best)
        for combo in closures[best]:  # its references run too
            if combo in paid_by:
                run(combo)
    return chosen


# ---- how closely a combination must agree with its reference

# (steps rel, weights abs) each comparison may differ by, per precision; measured values in docs/testing.md.
# Activation checkpointing recomputes the same operations: bitwise. Otherwise AdamW turns rounding in a
# near-zero gradient entry into a whole update of either sign, so a weight may move by up to 2 x the
# sum of the learning rates (7.2e-3 over the 3 steps here): in bf16 it does, and only the steps are
# checked (None: the weights' difference is reported, not asserted).
TOLERANCE: dict[tuple[str, str], tuple[float, float | None]] = {
    ("ac", "fp32"): (0.0, 0.0),
    ("ac", "bf16"): (0.0, 0.0),
    ("compile", "fp32"): (2e-5, 2e-4),  # the fused chunked loss compiled sits nearest (docs/testing.md)
    ("compile", "bf16"): (1e-2, None),  # the gradient norm moves most
    ("ranks", "fp32"): (1e-5, 5e-6),  # tests/test_distributed.py's
    ("ranks", "bf16"): (5e-3, None),  # about one bf16 rounding (4e-3): a late gradient norm with oneDNN bf16 GEMMs
}


def tolerance(kind: str, precision: str, compiled: bool = False) -> tuple[float, float | None]:
    """A joint comparison ('compile+ranks') allows the sum of its parts. Activation checkpointing of
    compiled blocks in bf16 is compared as compiled vs eager is: inductor keeps a fused kernel's
    intermediates in fp32 and rounds to bf16 where a kernel stores, and the recomputing backward
    fuses the forward's operations into other kernels than the one that saved them, so values are
    rounded at other points (fp32 has no such rounding: bitwise there)."""
    if kind == "ac" and compiled and precision == "bf16":
        kind = "compile"
    parts = [TOLERANCE[k, precision] for k in kind.split("+")]
    weights = [p[1] for p in parts]
    return sum(p[0] for p in parts), None if None in weights else sum(weights)
