"""Offline zero-shot evaluation: release-file loaders, fidelity to lm-eval's stock tasks, and an
end-to-end run through ``lm_eval.simple_evaluate`` with a tiny random Llama."""

from __future__ import annotations

import bz2
import json
import math
from pathlib import Path

import pytest
import torch

from flatten_lightning import zeroshot as zs
from flatten_lightning.tasks import TASKS_DIR
from flatten_lightning.tasks import loaders as L

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zeroshot-dev"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"dev data slice not found at {DATA}")


def _lines(rel: str) -> list[str]:
    return [x for x in (DATA / rel).read_text(encoding="utf-8").split("\n") if x.strip()]


# ------------------------------------------------------------------------------------ loaders
def _expected_count(task: str) -> int:
    if task == "hellaswag":
        with bz2.open(DATA / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
            return len(f.read().rstrip("\n").split("\n")) // 6
    if task == "openbookqa":
        return len(_lines("openbookqa/test.tsv")) - 1  # header row
    return len(_lines(L.TASK_FILES[task][0][0]))


@pytest.mark.parametrize("task", zs.TASKS)
def test_every_task_reads_all_items(task: str) -> None:
    docs = L.READERS[task](DATA)
    assert len(docs) == _expected_count(task) > 0


def test_piqa_labels_come_from_the_aligned_labels_file() -> None:
    docs, labels = L.read_piqa(DATA), _lines("piqa/valid-labels.lst")
    assert [d["label"] for d in docs] == [int(x) for x in labels]
    assert docs[0]["goal"] == json.loads(_lines("piqa/valid.jsonl")[0])["goal"]


def test_arc_numeric_answer_keys_map_to_the_right_choice() -> None:
    docs = {d["id"]: d for d in L.read_arc_easy(DATA)}
    d = docs["NYSEDREGENTS_2015_8_31"]  # labels "1".."4", answer "4"
    assert d["choices"]["label"] == ["1", "2", "3", "4"] and d["answerKey"] == "4"
    assert d["choices"]["label"].index(d["answerKey"]) == 3
    assert len(docs["TIMSS_2003_4_pg35"]["choices"]["text"]) == 5
    assert len(docs["NYSEDREGENTS_2013_4_26"]["choices"]["text"]) == 3


def test_openbookqa_choices_are_split_from_the_release_string() -> None:
    d = L.read_openbookqa(DATA)[0]
    assert d["choices"] == {
        "text": ["make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends"],
        "label": ["A", "B", "C", "D"],
    }
    assert d["answerKey"] == "B"
    # A marker-like "(B)" inside an option does not split it: markers are taken in order.
    assert L.parse_obqa_choices("(A) x (B) y (see (B)) (C) z (D) w")["text"] == ["x", "y (see (B))", "z", "w"]


def test_hellaswag_groups_six_lines_per_item() -> None:
    docs = L.read_hellaswag(DATA)
    d = docs[0]
    assert (d["activity_label"], d["ctx_a"], d["ctx_b"], d["label"]) == (
        "Roof shingle removal",
        "A man is sitting on a roof.",
        "he",
        "3",
    )
    assert d["endings"][3] == "starts pulling up roofing on a roof."
    assert docs[1]["activity_label"] == "Sharpening knives" and docs[1]["label"] == "3"


@pytest.mark.parametrize(
    "ctx, split",
    [
        ("A man is sitting on a roof. he", ("A man is sitting on a roof.", "he")),
        (". a colorful intro with words", (".", "a colorful intro with words")),
        ('He says "hi." the man', ('He says "hi."', "the man")),
        ("How to cut hair. Wet it. Comb it.", ("How to cut hair. Wet it. Comb it.", "")),
        ("a man", ("", "a man")),
    ],
)
def test_hellaswag_context_split(ctx: str, split: tuple[str, str]) -> None:
    assert L._split_context(ctx) == split


def test_winogrande_labels_come_from_dev_labels() -> None:
    docs, labels = L.read_winogrande(DATA), _lines("winogrande/dev-labels.lst")
    assert [d["answer"] for d in docs] == labels
    assert L.winogrande_doc_to_text(docs[0]) == int(labels[0]) - 1
    assert L.winogrande_doc_to_target(docs[0]) == "always got the easier cases."


def test_boolq_and_lambada_fields() -> None:
    rows = [json.loads(x) for x in _lines("boolq/val.jsonl")]
    assert [d["label"] for d in L.read_boolq(DATA)] == [int(str(r["label"]).lower() == "true") for r in rows]
    assert L.read_lambada(DATA)[0]["text"].endswith("care about signs")


# -------------------------------------------------------------------------- bad items named
def _jsonl_edit(row: dict, key: str, value) -> dict:
    if value is None:
        row.pop(key)
    else:
        row[key] = value
    return row


def _corrupt(tmp: Path, rel: str, line: int, edit) -> Path:
    """Copy the dev data to ``tmp`` and replace line ``line`` (1-based) of ``rel`` by ``edit(line text)``."""
    import shutil

    shutil.copytree(DATA, tmp, dirs_exist_ok=True)
    path = tmp / rel
    if rel.endswith(".bz2"):
        with bz2.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    else:
        lines = path.read_text(encoding="utf-8").split("\n")
    lines[line - 1] = edit(lines[line - 1])
    text = "\n".join(lines)
    if rel.endswith(".bz2"):
        with bz2.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _json_line(key: str, value):
    return lambda line: json.dumps(_jsonl_edit(json.loads(line), key, value))


@pytest.mark.parametrize(
    "task, rel, line, edit, problem",
    [
        ("boolq", "boolq/val.jsonl", 2, _json_line("label", "yes"), "label 'yes' is not one of"),
        ("piqa", "piqa/valid-labels.lst", 3, lambda _: "2", "label '2' is not one of 0, 1"),
        ("piqa", "piqa/valid.jsonl", 1, _json_line("goal", None), "no 'goal' key"),
        ("winogrande", "winogrande/dev-labels.lst", 1, lambda _: "3", "label '3' is not one of 1, 2"),
        ("arc_easy", "arc_easy/ARC-Easy-Test.jsonl", 4, _json_line("answerKey", "Z"), "label 'Z' is not one of"),
        ("openbookqa", "openbookqa/test.tsv", 2, lambda s: s[: s.rindex("\t") + 1] + "E", "label 'E' is not one of A, B, C, D"),
        ("hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", 8, lambda _: "7", "label '7' is not one of 0, 1, 2, 3"),
        ("lambada", "lambada/lambada_test.jsonl", 5, lambda _: "{not json", "not valid JSON"),
    ],
    ids=["boolq-yes", "piqa-label", "piqa-key", "winogrande", "arc", "openbookqa", "hellaswag", "lambada-json"],
)
def test_a_bad_item_is_named_by_file_and_line(tmp_path: Path, task, rel, line, edit, problem) -> None:
    path = _corrupt(tmp_path, rel, line, edit)
    with pytest.raises(L.ZeroShotDataError, match=f"^{path} line {line}: {problem}.*Fix"):
        L.READERS[task](tmp_path)


# ------------------------------------------------------------------------- fidelity to stock
STOCK = Path(__import__("lm_eval").__file__).parent / "tasks"
STOCK_YAML = {
    "fl_piqa": "piqa/piqa.yaml",
    "fl_arc_easy": "arc/arc_easy.yaml",
    "fl_arc_challenge": "arc/arc_challenge.yaml",
    "fl_winogrande": "winogrande/default.yaml",
    "fl_hellaswag": "hellaswag/hellaswag.yaml",
    "fl_boolq": "super_glue/boolq/default.yaml",
    "fl_openbookqa": "openbookqa/openbookqa.yaml",
    "fl_lambada_openai": "lambada/lambada_openai.yaml",
}


@pytest.mark.parametrize("task", sorted(STOCK_YAML))
def test_prompt_fields_equal_the_stock_task(task: str) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_yaml(TASKS_DIR / f"{task}.yaml", resolve_func=False, recursive=True)
    stock = load_yaml(STOCK / STOCK_YAML[task], resolve_func=False, recursive=True)
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter", "num_fewshot"):
        if isinstance(stock.get(key), str) and stock[key].endswith(("doc_to_text", "doc_to_target", "doc_to_choice")):
            continue  # a python function in the stock task; compared in the winogrande test
        assert ours.get(key) == stock.get(key), key
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in stock["metric_list"]]
    assert ours["metadata"]["version"] == stock["metadata"]["version"]


def test_hellaswag_docs_equal_stock_process_docs() -> None:
    import datasets
    from lm_eval.tasks.hellaswag import utils as stock

    raw = datasets.Dataset.from_list(L.read_hellaswag(DATA))
    ours, theirs = L.hellaswag_process_docs(raw), stock.process_docs(raw)
    for key in ("query", "choices", "gold"):
        assert ours[key] == theirs[key]
    assert ours[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    # The WikiHow markers the stock cleaning removes.
    text = "Home: [header] How to x [title] Do y. [step] Then z [not recommended]."
    assert L.hellaswag_clean(text) == stock.preprocess(text) == "Home: How to x. Do y. Then z ."


def test_winogrande_matches_stock_functions() -> None:
    from lm_eval.tasks.winogrande import preprocess_winogrande as stock

    for d in L.read_winogrande(DATA)[:20]:
        a, b = d["context_options"]
        n = len(next(p for p in (a[:i] for i in range(len(a), -1, -1)) if b.startswith(p)))
        hub_doc = {"sentence": a[:n] + "_ " + d["continuation"], "option1": a[n:], "option2": b[n:], "answer": d["answer"]}
        assert L.winogrande_doc_to_text(d) == stock.doc_to_text(hub_doc)
        assert L.winogrande_doc_to_choice(d) == stock.doc_to_choice(hub_doc)
        assert L.winogrande_doc_to_target(d) == stock.doc_to_target(hub_doc)


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flatten_lightning.sources import resolve_source

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend with whatever else runs
    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2"))  # the embedded model's tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    yield LlamaForCausalLM(cfg).eval(), tok
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def all_tasks(tiny):
    model, tok = tiny
    return zs.evaluate_zeroshot(model, tok, str(DATA), limit=4, batch_size=8)


def test_every_task_runs_through_lm_eval(all_tasks) -> None:
    assert set(zs.TASKS) <= set(all_tasks)
    for task in zs.TASKS:
        r = all_tasks[task]
        assert r["n"] == 4, task
        assert 0.0 <= r["acc"] <= 1.0, task
        assert (r["acc_norm"] is None) == (task in ("winogrande", "boolq", "lambada")), task
        assert r["chance"] == pytest.approx(zs.chance_accuracy(task, DATA, limit=4)), task
        if task in zs.PAPER_TASKS:  # each item's headline score, whose mean is the headline accuracy
            assert len(r["items"]) == 4 and set(r["items"]) <= {0.0, 1.0}, task
            assert sum(r["items"]) / 4 == pytest.approx(zs.headline(r)), task
    assert all_tasks["lambada"]["perplexity"] > 1.0
    expected = sum(zs.headline(all_tasks[t]) for t in zs.PAPER_TASKS) / 5
    assert all_tasks["paper_avg"] == pytest.approx(expected)
    assert all_tasks["paper_chance_avg"] == pytest.approx(0.35)
    assert "paper 5-task avg" in zs.format_results(all_tasks)


@torch.no_grad()
def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    # lm-eval's causal scoring: encode context+continuation whole, score the tokens past the context.
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_piqa_accuracy_equals_a_manual_computation(tiny, monkeypatch) -> None:
    import lm_eval

    model, tok = tiny
    n = 24
    captured = {}
    real = lm_eval.simple_evaluate

    def spy(**kwargs):
        captured.update(real(**kwargs))
        return captured

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    got = zs.evaluate_zeroshot(model, tok, DATA, tasks=["piqa"], limit=n)["piqa"]
    samples = captured["samples"]["fl_piqa"]
    acc = acc_norm = 0
    for d, sample in zip(L.read_piqa(DATA)[:n], samples, strict=True):
        choices = [d["sol1"], d["sol2"]]
        lls = [_loglikelihood(model, tok, f"Question: {d['goal']}\nAnswer:", " " + c) for c in choices]
        # Per-choice log-likelihoods, not just the argmax: a random model's choice barely depends on the prompt.
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(lls, rel=1e-4, abs=1e-3)
        acc += max(range(2), key=lambda i: lls[i]) == d["label"]
        acc_norm += max(range(2), key=lambda i: lls[i] / len(choices[i])) == d["label"]
    assert got["n"] == n
    assert got["acc"] == pytest.approx(acc / n)
    assert got["acc_norm"] == pytest.approx(acc_norm / n)


def test_paired_gap_is_the_mean_item_difference_with_its_paired_standard_error() -> None:
    x = {"t1": {"items": [1.0, 1.0, 0.0, 0.0]}, "t2": {"items": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]}}
    y = {"t1": {"items": [1.0, 0.0, 0.0, 0.0]}, "t2": {"items": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]}}
    gap, se = zs.paired_gap(x, y, tasks=("t1", "t2"))
    # t1: d = (0, 1, 0, 0), mean 1/4, sample variance 1/4; t2: d = 0. gap = (1/4 + 0) / 2.
    assert gap == pytest.approx(0.125)
    assert se == pytest.approx(math.sqrt(0.25 / 4) / 2)
    assert zs.paired_gap(x, x, tasks=("t1", "t2")) == (0.0, 0.0)  # a model against itself: no gap, no noise
    # Pairing: the items both models get right or wrong add no noise; two independent binomial errors would.
    unpaired = math.sqrt(0.5 * 0.5 / 4 + 0.25 * 0.75 / 4 + 2 * 0.5 * 0.5 / 6) / 2
    assert se < unpaired
    y["t2"]["items"] = y["t2"]["items"][:-1]
    with pytest.raises(ValueError, match="task t2: paired_gap needs the same scored items"):
        zs.paired_gap(x, y, tasks=("t1", "t2"))


def test_arc_chance_is_per_item() -> None:
    docs = L.read_arc_easy(DATA)
    assert zs.chance_accuracy("arc_easy", DATA) == pytest.approx(sum(1 / len(d["choices"]["text"]) for d in docs) / len(docs))
    assert zs.chance_accuracy("arc_easy", DATA) != 0.25  # one 3-choice and one 5-choice item
    assert zs.chance_accuracy("hellaswag") == 0.25


# ------------------------------------------------------------------------------------ errors
def test_missing_data_dir_is_reported_before_any_model_work(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*Fix"):
        zs.evaluate_zeroshot(None, None, str(tmp_path / "nowhere"), tasks=["piqa"])


def test_missing_task_file_names_the_expected_path(tmp_path: Path) -> None:
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=r"piqa/valid-labels\.lst"):
        zs.evaluate_zeroshot(None, None, tmp_path, tasks=["piqa"])


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown task.*no_such_task.*piqa, winogrande"):
        zs.evaluate_zeroshot(None, None, DATA, tasks=["piqa", "no_such_task"])


def test_other_task_names_pass_through_to_lm_eval() -> None:
    plan, manager = zs._resolve(["fl_piqa", "piqa", "lambada_standard"], DATA)
    assert plan == [("piqa", "fl_piqa"), ("lambada_standard", "lambada_standard")]
    assert "lambada_standard" in manager.all_tasks  # the stock index was loaded for it


def test_loader_without_data_dir_metadata_says_how_to_pass_it() -> None:
    with pytest.raises(ValueError, match="fl_data_dir"):
        L.piqa_dataset(version=1.0)
