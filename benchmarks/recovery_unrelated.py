"""Recovery on text unrelated to the evaluation: held-out WikiText-2 perplexity against training tokens.

A user recovers a compressed model on their own instruction or web text, not on the evaluation text.
Here the training text is Alpaca (``alpaca_en_demo.json``) and C4 (``c4_demo.jsonl``) only; not one
WikiText token is trained on. Starting from a compressed export of ``--source`` (``flatten-compress
--out DIR``), each recipe is one Lightning fit of ``FlattenModule`` (``start_from_export``: the
export's plans and weights, the dense source as teacher) with ``FlattenDataModule`` and
``LoRACallback``; the recipes differ only in the loss (``flatten_lightning.distill``):

    ce                LoRA, next-token cross entropy                  (distill_alpha 0, distill_hidden 0)
    kd                LoRA, logit distillation from the dense model   (distill_alpha --kd-alpha)
    hidden            LoRA, CE + hidden-state distillation            (distill_hidden --hidden-weight, global norm)
    hidden-token      the same, each token's relative error           (distill_hidden_norm token)
    kd+hidden(-token) LoRA, logit + hidden-state distillation         (both)

Same adapters (initialisation seed), same batches in the same order, same dropout seeds, same lr.
Held-out: WikiText-2 validation windows of ``--eval-seqlen`` tokens after the first
``--calib-samples x --calib-seqlen`` tokens (the calibration region of the compression), scored by
the library protocol (``flatten_lightning.perplexity``), at step 0 (the export itself: LoRA's B starts
at zero, so it is measured once for all recipes) and after every ``--eval-every`` steps.
``--dense-baseline`` also trains the dense source with the first recipe, the same way: what the training
text buys a model that lost nothing, so a recovered ratio can be read against it. ``--teacher recovered``
trains the dense source with ce first (the same steps and batches) and makes that model, frozen, the teacher
of the distilling recipes: two stages, the teacher adapted to the training text before it teaches.
Results: ``OUT/results.json`` and ``OUT/results.md``, rewritten atomically after each recipe.

    .venv/bin/python benchmarks/recovery_unrelated.py --model runs/smollm2_24 --source smollm2 --out runs/recovery_unrelated \\
        [--recipes ce,kd,hidden] [--steps 100] [--eval-every 25] [--batch-size 4] [--seqlen 256] [--eval-windows 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from lightning.pytorch import Callback, seed_everything
from transformers import PreTrainedModel

from callbacks import LoRACallback
from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.checks import at_least
from flatten_lightning.data import HELD_OUT_STARTS
from flatten_lightning.export import REPORT_NAME, check_writable
from flatten_lightning.lightning import FlattenDataModule, FlattenModule
from flatten_lightning.lightning.fit import training_only_trainer
from flatten_lightning.lora import LoraSpec
from flatten_lightning.schedule import SCHEDULES
from flatten_lightning.sources import EMBEDDED_DEFAULT

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
WIKITEXT = os.path.join(DATA, "wikitext-2", "valid.txt")
TRAIN_FILES = [os.path.join(DATA, "alpaca", "alpaca_en_demo.json"), os.path.join(DATA, "c4", "c4_demo.jsonl")]
RECIPES = ("ce", "kd", "hidden", "hidden-token", "kd+hidden", "kd+hidden-token")
TEACHERS = ("dense", "recovered")  # what the distilling recipes learn from: the source, or the source after ce recovery


def is_evaluation_text(files: list[str], eval_file: str = WIKITEXT) -> bool:
    """Whether any of ``files`` is ``eval_file`` (by real path, so a link or a relative path to it counts)."""
    evaluated = os.path.realpath(eval_file)
    return any(os.path.realpath(f) == evaluated for f in files)


@dataclass
class Setup:
    """Everything the recipes share."""

    export: str  # compressed export (flatten-compress --out) of ``source``
    source: str = EMBEDDED_DEFAULT  # the dense model: teacher, and the structure the plans replay on
    train_files: list[str] = field(default_factory=lambda: list(TRAIN_FILES))
    eval_file: str = WIKITEXT
    calib_samples: int = 32  # the held-out windows start after calib_samples x calib_seqlen tokens
    calib_seqlen: int = 512
    eval_seqlen: int = 2048
    eval_windows: int = 4
    eval_start: str = "tokens"  # held-out text from right after the calibration tokens, or "article": the next article
    seqlen: int = 256  # training window
    batch_size: int = 4
    steps: int = 100
    eval_every: int = 25
    lr: float = 5e-4
    lr_schedule: str = "constant"  # or cosine to 0 at the last step (flatten_lightning.schedule)
    warmup_steps: int = 0
    kd_alpha: float = 1.0  # weight of logit KD in the kd recipes (1 = KD only, no CE)
    hidden_weight: float = 1.0  # weight of hidden-state KD in the hidden recipes
    temperature: float = 2.0
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=8, alpha=16, dropout=0.05, target_modules=[], seed=0))
    seed: int = 0
    dense_baseline: bool = False  # also train the dense source with the first recipe: what the same text buys it
    teacher: str = "dense"  # or "recovered": the distilling recipes learn from the dense source after the same ce recovery

    def losses(self, recipe: str) -> dict[str, float]:
        """FlattenModule's loss weights for ``recipe``."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        return {
            "distill_alpha": self.kd_alpha if "kd" in recipe else 0.0,
            "distill_hidden": self.hidden_weight if "hidden" in recipe else 0.0,
            "distill_hidden_norm": "token" if recipe.endswith("-token") else "global",
        }

    def distils(self, recipe: str) -> bool:
        """Whether ``recipe`` learns from a teacher (logit or hidden-state distillation)."""
        losses = self.losses(recipe)
        return losses["distill_alpha"] > 0 or losses["distill_hidden"] > 0

    def check(self) -> None:
        """Refuse, before any model loads, what would make the measurement wrong or the run fail late."""
        if not os.path.isfile(os.path.join(self.export, REPORT_NAME)):
            raise FileNotFoundError(f"--model {self.export} has no {REPORT_NAME}: pass the --out of flatten-compress")
        for f in [*self.train_files, self.eval_file]:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f} does not exist")
        if is_evaluation_text(self.train_files, self.eval_file):
            raise ValueError(f"training file {self.eval_file} is the evaluation text: this benchmark trains on unrelated text only")
        if self.eval_every < 1 or self.steps % self.eval_every:
            raise ValueError(f"--steps {self.steps} must be a multiple of --eval-every {self.eval_every}")

    def datamodule(self, tokenizer) -> FlattenDataModule:
        """Training windows from the training files only; validation ids = the eval file after the calibration tokens."""
        dm = FlattenDataModule(
            self.eval_file,  # only its calibration region is cut (and never used) and its held-out tokens evaluated
            self.calib_samples,
            self.calib_seqlen,
            train_files=self.train_files,
            train_seqlen=self.seqlen,
            val_windows=self.eval_windows,
            val_seqlen=self.eval_seqlen,
            val_start=self.eval_start,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        dm.prepare(tokenizer)
        if len(dm.train) < self.steps * self.batch_size:
            raise ValueError(
                f"only {len(dm.train)} training windows of {self.seqlen} tokens; {self.steps} steps of {self.batch_size} need "
                f"{self.steps * self.batch_size} (one epoch). Fix: lower --steps or --batch-size."
            )
        return dm

    def start(self, recipe: str, known: dict | None = None, dense: bool = False) -> tuple[FlattenModule, FlattenDataModule, dict]:
        """The module (the export, or with ``dense`` the source itself, ready to recover with ``recipe``'s losses), its
        data and the held-out perplexities {dense, compressed} (the same windows): those in ``known`` as given, the
        others measured here (``compressed`` only when the export is loaded)."""
        m = FlattenModule(
            self.source,
            lr=self.lr,
            lr_schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps,
            distill_temperature=self.temperature,
            seed=self.seed,
            **self.losses(recipe),
        )
        dm = self.datamodule(m.tokenizer)
        held = (dm.validation_ids, self.eval_seqlen, self.eval_windows)
        reference = dict(known or {})
        if "dense" not in reference:  # before start_from_export: the dense model
            reference["dense"] = m.heldout_perplexity(*held)
        if dense:
            return m, dm, reference
        m.start_from_export(self.export)
        if "compressed" not in reference:
            reference["compressed"] = m.heldout_perplexity(*held)
        return m, dm, reference


class HeldOut(Callback):
    """Held-out perplexity (library protocol) after every ``every`` optimizer steps, and the mean training losses in between."""

    def __init__(self, ids: torch.Tensor, seqlen: int, windows: int, every: int, tokens_per_step: int) -> None:
        self.ids, self.seqlen, self.windows, self.every, self.tokens_per_step = ids, seqlen, windows, every, tokens_per_step
        self.points: list[dict] = []
        self._ce: list[float] = []
        self._loss: list[float] = []
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._loss.append(outputs["loss"].item())
        self._ce.append(trainer.callback_metrics["train_loss"].item())
        step = trainer.global_step
        if step % self.every == 0:
            ppl = pl_module.heldout_perplexity(self.ids, self.seqlen, self.windows)
            self.points.append(
                {
                    "step": step,
                    "tokens": step * self.tokens_per_step,
                    "ppl": ppl,
                    "train_ce": sum(self._ce) / len(self._ce),  # mean over the steps since the last point
                    "train_loss": sum(self._loss) / len(self._loss),
                    "seconds": time.perf_counter() - self._t0,
                }
            )
            print(f"  step {step}: held-out ppl {ppl:.3f}, train CE {self.points[-1]['train_ce']:.3f}", flush=True)
            self._ce, self._loss = [], []


def recover(
    setup: Setup, recipe: str, reference: dict | None = None, dense: bool = False, teacher: PreTrainedModel | None = None
) -> tuple[list[dict], FlattenModule, dict]:
    """One recipe: its points (step 0 first), the recovered module (adapters merged) and the reference
    perplexities ({dense, compressed}; those not given measured here). ``dense``: train the source itself the
    same way instead of the export (step 0 is then the dense model). ``teacher``: what a distilling recipe
    learns from instead of the dense source (``FlattenModule.use_teacher``)."""
    seed_everything(setup.seed, verbose=False)
    module, dm, reference = setup.start(recipe, reference, dense=dense)
    if teacher is not None and setup.distils(recipe):
        module.use_teacher(teacher)
    first = reference["dense" if dense else "compressed"]  # step 0: the model as it starts training
    # "source": the dense model, or for a peer's export trained as a model of its own (quality.py) that export.
    print(f"  held-out ppl: source {reference['dense']:.3f}, step 0 ({'source' if dense else 'compressed'}) {first:.3f}", flush=True)
    held = HeldOut(dm.validation_ids, setup.eval_seqlen, setup.eval_windows, setup.eval_every, setup.batch_size * setup.seqlen)
    lora = setup.lora
    adapters = LoRACallback(lora.r, lora.alpha, lora.dropout, lora.target_modules or None, lora.seed)
    training_only_trainer(setup.steps, [adapters, held]).fit(module, datamodule=dm)
    start = {"step": 0, "tokens": 0, "ppl": first, "train_ce": None, "train_loss": None, "seconds": 0.0}
    return [start, *held.points], module, reference


def _cells(points: list[dict], dense: float | None) -> list[str]:
    """A curve's table cells: held-out perplexity at each point (and / dense)."""
    return [f"{p['ppl']:.2f}" + (f" ({p['ppl'] / dense:.2f}x)" if dense else "") for p in points]


def table(results: dict) -> str:
    """Markdown: one row per recipe, held-out perplexity at each token count (and / dense)."""
    recipes = results["recipes"]
    if not recipes:
        return ""
    tokens = [p["tokens"] for p in next(iter(recipes.values()))["points"]]
    dense = results.get("dense_ppl")
    head = "| recipe | distill_alpha | distill_hidden | " + " | ".join(f"{t:,} tok" for t in tokens) + " |"
    lines = [head, "|" + "---|" * (3 + len(tokens))]
    for name, r in recipes.items():
        cells = _cells(r["points"], dense)
        hidden = r["losses"]["distill_hidden"]
        hidden_cell = f"{hidden} ({r['losses']['distill_hidden_norm']})" if hidden else f"{hidden}"
        lines.append(f"| {name} | {r['losses']['distill_alpha']} | {hidden_cell} | " + " | ".join(cells) + " |")
    base = results.get("dense_recovered")
    if base:
        lines.append(f"| dense source + {base['recipe']} | - | - | " + " | ".join(_cells(base["points"], dense)) + " |")
    taught = results.get("teacher_recovered")
    if taught:
        lines.append(f"| teacher: dense source + {taught['recipe']} | - | - | " + " | ".join(_cells(taught["points"], dense)) + " |")
    note = f"\nDense model on the same windows: {dense:.2f}." if dense else ""
    return "\n".join(lines) + "\n" + note + "\n"


def write(out: str, results: dict) -> None:
    write_text_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=2))
    write_text_atomic(os.path.join(out, "results.md"), table(results))


def run(setup: Setup, recipes: list[str], out: str) -> dict:
    if not recipes:  # nothing to measure, and --dense-baseline trains with the first recipe
        raise ValueError(f"--recipes names no recipe; choose from {', '.join(RECIPES)}")
    for r in recipes:
        setup.losses(r)  # unknown names fail before any work
    if setup.teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {setup.teacher!r}; choose from {', '.join(TEACHERS)}")
    if setup.teacher == "recovered" and not any(setup.distils(r) for r in recipes):
        raise ValueError("--teacher recovered trains a teacher that no recipe here learns from. Fix: add a kd or hidden recipe.")
    setup.check()
    check_writable(out)
    settings = asdict(setup)
    settings["lora"] = setup.lora.to_dict()
    results: dict = {"settings": settings, "dense_ppl": None, "recipes": {}}
    reference, teacher, dense_runs = None, None, {}  # dense_runs: recipe -> (points, module) of the source trained with it

    def dense_run(recipe: str) -> tuple[list[dict], FlattenModule]:
        """The dense source trained with ``recipe``: once, whether the teacher or the baseline asks for it."""
        nonlocal reference
        if recipe not in dense_runs:
            print(f"dense source, recipe {recipe}", flush=True)
            points, module, reference = recover(setup, recipe, reference, dense=True)
            dense_runs[recipe] = (points, module)
        return dense_runs[recipe]

    if setup.teacher == "recovered":  # stage one: the dense source recovered on the same text, then frozen
        points, dense_module = dense_run("ce")
        results["teacher_recovered"] = {"recipe": "ce", "points": points}
        teacher = dense_module.base_model
    for recipe in recipes:
        t0 = time.perf_counter()
        print(f"recipe {recipe} ({setup.losses(recipe)})", flush=True)
        points, _, reference = recover(setup, recipe, reference, teacher=teacher)
        results["dense_ppl"] = reference["dense"]
        results["recipes"][recipe] = {"losses": setup.losses(recipe), "points": points, "seconds": time.perf_counter() - t0}
        write(out, results)
    if setup.dense_baseline:
        results["dense_recovered"] = {"recipe": recipes[0], "points": dense_run(recipes[0])[0]}
        write(out, results)
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", dest="export", required=True, help="compressed export (the --out of flatten-compress) of --source")
    ap.add_argument("--source", default=EMBEDDED_DEFAULT, help="the dense model the export was compressed from (the teacher)")
    ap.add_argument(
        "--train-files",
        nargs="+",
        default=list(TRAIN_FILES),
        metavar="FILE",
        help="recovery text (.txt, .jsonl, Alpaca .json; default: the Alpaca and C4 samples), never the evaluation text",
    )
    ap.add_argument("--recipes", default="ce,kd,hidden,hidden-token", help=f"comma-separated, from {', '.join(RECIPES)}")
    ap.add_argument("--steps", type=at_least(1), default=100)
    ap.add_argument("--eval-every", type=at_least(1), default=25, help="held-out perplexity after every this many steps")
    ap.add_argument("--batch-size", type=at_least(1), default=4)
    ap.add_argument("--seqlen", type=at_least(2), default=256, help="tokens per training window")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lr-schedule", default="constant", choices=SCHEDULES, help="constant, or cosine to 0 at the last step")
    ap.add_argument("--warmup-steps", type=at_least(0), default=0, help="optimizer steps of linear warmup")
    ap.add_argument("--kd-alpha", type=float, default=1.0, help="distill_alpha of the kd recipes (1 = distillation only)")
    ap.add_argument("--hidden-weight", type=float, default=1.0, help="distill_hidden of the hidden recipes")
    ap.add_argument("--temperature", type=float, default=2.0, help="distill_temperature tau of the kd recipes")
    ap.add_argument("--eval-windows", type=at_least(1), default=4, help="held-out windows of --eval-seqlen tokens")
    ap.add_argument("--eval-seqlen", type=at_least(2), default=2048)
    ap.add_argument(
        "--eval-start",
        default="tokens",
        choices=HELD_OUT_STARTS,
        help="held-out windows from right after the calibration tokens or the next article",
    )
    ap.add_argument("--calib-samples", type=at_least(1), default=32, help="held-out text starts after calib-samples x calib-seqlen tokens")
    ap.add_argument("--calib-seqlen", type=at_least(1), default=512)
    ap.add_argument("--dense-baseline", action="store_true", help="also train the dense source with the first recipe")
    ap.add_argument(
        "--teacher",
        default="dense",
        choices=TEACHERS,
        help="recovered: distil from the dense source after the same ce recovery (two stages)",
    )
    ap.add_argument("--lora-r", type=at_least(1), default=8, help="LoRA rank (capacity of the recovery)")
    ap.add_argument("--lora-alpha", type=at_least(1), default=16, help="LoRA scale numerator (scale = alpha / r)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default="runs/recovery_unrelated", help="directory for results.json and results.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(**{f.name: getattr(args, f.name) for f in fields(Setup) if hasattr(args, f.name)})  # flags named as the fields
    setup.lora = replace(setup.lora, r=args.lora_r, alpha=args.lora_alpha)
    results = run(setup, [r.strip() for r in args.recipes.split(",") if r.strip()], args.out)
    print(table(results))
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad settings: one line, before any work
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
