"""The numbers the docs quote are the numbers the executed notebooks print (or lie inside the ranges quoted).

Each check pairs a pattern in a doc with a pattern in a notebook's saved outputs (or in a file the number comes
from). A doc number written with n decimals must equal the source's number rounded to n decimals, so re-executing
a notebook whose results move, or editing a doc number by hand, fails here until the two agree again.
"""
import json
import re

import pytest

from conftest import REPO, SHIPPED
from test_reference import F32_TOL, F64_TOL

NUM = r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"


def notebook_output(name):
    """All text a notebook printed (stdout streams and text results), in cell order."""
    nb = json.loads((REPO / "notebooks" / name).read_text())
    out = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            out.append("".join(o.get("text", "")) or "".join(o.get("data", {}).get("text/plain", "")))
    text = "\n".join(out)
    assert text.strip(), f"notebooks/{name} has no saved outputs: commit it executed"
    return text


def doc(name):
    return (REPO / name).read_text()


def grab(text, pattern, where):
    m = re.search(pattern, text)
    assert m, f"{where}: no match for {pattern!r}"
    return m.group(1)


def agrees(quoted, value):
    """The quoted string is the value rounded to the quoted number of decimals (or significant digits in e-form)."""
    q = float(quoted)
    if "e" in quoted:
        digits = len(quoted.split("e")[0].split(".")[-1]) if "." in quoted else 0
        return abs(q - value) <= 0.5 * 10 ** (-digits) * 10 ** int(quoted.split("e")[1]) * (1 + 1e-9)
    digits = len(quoted.split(".")[1]) if "." in quoted else 0
    return abs(q - value) <= 0.5 * 10 ** (-digits) + 1e-12


# (doc, pattern in the doc, notebook, pattern in its output)
PAIRS = [
    # docs/speculative_sampling.md, "Checks" table and section 4 <- notebook 02
    ("docs/speculative_sampling.md", r"notebook §1 \(exact enumeration; χ², 4000 draws\) \| χ² = " + NUM,
     "02_speculative_sampling.ipynb", r"one token, 4000 draws: χ² = " + NUM),
    ("docs/speculative_sampling.md", r"df = 5, p = " + NUM, "02_speculative_sampling.ipynb", r"df = 5, p-value = " + NUM),
    ("docs/speculative_sampling.md", r"acceptance " + NUM + " vs β", "02_speculative_sampling.ipynb", r"acceptance rate " + NUM),
    ("docs/speculative_sampling.md", r"vs β = " + NUM, "02_speculative_sampling.ipynb", r"vs β = " + NUM),
    ("docs/speculative_sampling.md", r"`test_chain_rejection_sampling_\*` \| χ² = " + NUM,
     "02_speculative_sampling.ipynb", r"chain, K = 2, 3000 runs: χ² = " + NUM),
    ("docs/speculative_sampling.md", r"`test_chain_rejection_sampling_\*` \| χ² = [0-9.]+, df = 24, p = " + NUM,
     "02_speculative_sampling.ipynb", r"chain, K = 2, 3000 runs: χ² = [0-9.]+, df = 24, p-value = " + NUM),
    ("docs/speculative_sampling.md", r"are lossy \| notebook §2 \| χ² = " + NUM,
     "02_speculative_sampling.ipynb", r"softmax draft_probs, 1000 runs: χ² = " + NUM),
    ("docs/speculative_sampling.md", r"`test_tree_rejection_sampling_\*` \| χ² = " + NUM,
     "02_speculative_sampling.ipynb", r"tree, 3000 runs: χ² = " + NUM),
    ("docs/speculative_sampling.md", r"`test_tree_rejection_sampling_\*` \| χ² = [0-9.]+, df = 24, p = " + NUM,
     "02_speculative_sampling.ipynb", r"tree, 3000 runs: χ² = [0-9.]+, df = 24, p-value = " + NUM),
    ("docs/speculative_sampling.md", r"\| χ² = " + NUM + " vs [0-9.]+ for rejection",
     "02_speculative_sampling.ipynb", r"typical acceptance, +1500 runs: χ² = +" + NUM),
    ("docs/speculative_sampling.md", r"\| χ² = [0-9.]+ vs " + NUM + " for rejection",
     "02_speculative_sampling.ipynb", r"recursive rejection, same drafts: +χ² = +" + NUM),
    ("docs/speculative_sampling.md", r"time, against " + NUM + "% under plain sampling",
     "02_speculative_sampling.ipynb", r"P\(first token = argmax \d+\): AR " + NUM),   # percent: compared below
    ("docs/speculative_sampling.md", r"χ² = " + NUM + ", df = 24 over 1500 runs",
     "02_speculative_sampling.ipynb", r"typical acceptance, +1500 runs: χ² = +" + NUM),
    ("docs/speculative_sampling.md", r"same drafts gives χ² = " + NUM,
     "02_speculative_sampling.ipynb", r"recursive rejection, same drafts: +χ² = +" + NUM),
    ("docs/speculative_sampling.md", r"same drafts gives χ² = [0-9.]+, p = " + NUM,
     "02_speculative_sampling.ipynb", r"recursive rejection, same drafts: +χ² = +[0-9.]+, df = 24, p-value = " + NUM),
    ("docs/speculative_sampling.md", r"identical tokens, τ = " + NUM + " with 3 random heads",
     "02_speculative_sampling.ipynb", r"acceptance='greedy' +: \d+ steps for \d+ tokens, τ = " + NUM),
    # docs/medusa.md <- notebook 03 (greedy, deterministic)
    ("docs/medusa.md", r"estimate \(" + NUM + "×: per step", "03_medusa.ipynb", r"measured / expected tau: " + NUM),
    ("docs/medusa.md", r"expected τ \(CPU tree / 32-node GPU tree\) \| " + NUM,
     "03_medusa.ipynb", r"expected from heads.accuracies: .*-> tau " + NUM),
]


@pytest.mark.parametrize("doc_name, doc_pat, nb_name, nb_pat", PAIRS,
                         ids=[f"{p[0].split('/')[-1]}-{i}" for i, p in enumerate(PAIRS)])
def test_a_number_the_docs_quote_is_what_the_notebook_printed(doc_name, doc_pat, nb_name, nb_pat):
    quoted = grab(doc(doc_name), doc_pat, doc_name)
    value = float(grab(notebook_output(nb_name), nb_pat, f"notebooks/{nb_name}"))
    if doc_pat.endswith("% under plain sampling"):
        value *= 100
    assert agrees(quoted, value), f"{doc_name} quotes {quoted}, notebooks/{nb_name} printed {value}"


def test_the_fp64_and_fp32_errors_notebook_01_prints_lie_in_the_ranges_docs_mistral_md_quotes():
    out = notebook_output("01_mistral_forward.ipynb")
    text = doc("docs/mistral.md")
    f32 = float(grab(out, r"model vs HF float32 \(for scale\) +" + NUM, "notebook 01"))
    f64 = float(grab(out, r"model vs HF pure float64 +" + NUM, "notebook 01"))
    lo32, hi32 = map(float, re.search(r"eager \(`logits`\) \| 1e-4 \| " + NUM + " … " + NUM, text).groups())
    lo64, hi64 = map(float, re.search(r"\(`logits_f64`\) \| 1e-12 \| " + NUM + " … " + NUM, text).groups())
    assert lo32 <= f32 <= hi32 and lo64 <= f64 <= hi64, (f32, (lo32, hi32), f64, (lo64, hi64))


def test_the_tolerances_the_docs_and_readme_quote_are_the_ones_the_tests_use():
    text = doc("docs/mistral.md")
    assert float(grab(text, r"eager \(`logits`\) \| " + NUM + r" \|", "docs/mistral.md")) == F32_TOL
    assert float(grab(text, r"\(`logits_f64`\) \| " + NUM + r" \|", "docs/mistral.md")) == F64_TOL
    readme = doc("README.md")
    assert float(grab(readme, r"float32: < " + NUM, "README.md")) == F32_TOL
    assert float(grab(readme, r"float64: < " + NUM, "README.md")) == F64_TOL
    nb = json.loads((REPO / "notebooks" / "01_mistral_forward.ipynb").read_text())
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert f"rel_err(logits_model, ref[\"logits_f64\"]) < {F64_TOL:g}" in code


def test_the_heads_numbers_in_docs_medusa_md_are_the_shipped_heads_own_record():
    cfg = json.loads((SHIPPED / "medusa" / "medusa_config.json").read_text())
    text = doc("docs/medusa.md")
    top1 = re.search(r"held-out top-1 per head \| " + ", ".join([NUM] * 4), text).groups()
    assert all(agrees(q, row[0]) for q, row in zip(top1, cfg["accuracies"]))
    cpu, gpu = re.search(r"expected τ \(CPU tree / 32-node GPU tree\) \| " + NUM + " / " + NUM, text).groups()
    choice = cfg["tree_choice"]
    assert agrees(cpu, choice["cpu_expected_tau"]) and agrees(gpu, choice["gpu_expected_tau"])
    assert len(cfg["tree_cuda"]) == choice["gpu_budget"] == 32


def test_the_shipped_models_numbers_in_the_readme_are_its_data_cards():
    card = json.loads((SHIPPED / "datacard.json").read_text())
    readme = doc("README.md")
    nats, bpb, gz = re.search(r"shipped model, held-out \| " + NUM + " nats/token, " + NUM + r" bits/byte \(gzip -9: "
                              + NUM + r"\)", readme).groups()
    held = card["heldout"]
    assert agrees(nats, held["loss"]) and agrees(bpb, held["bits_per_byte"]) and agrees(gz, held["gzip9_bits_per_byte"])
