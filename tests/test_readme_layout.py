"""The README's layout table lists every folder and module of the package, every notebook and every docs page,
and names nothing that is not there."""
import re

from conftest import REPO


def layout_rows(readme):
    """{path cell: description cell} of the table under '## Layout'."""
    section = readme.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.fullmatch(r"\| (.+?) \| (.+) \|", line)
        if m and not m.group(1).startswith("---") and m.group(1) != "path":
            rows[m.group(1)] = m.group(2)
    return rows


def layout_problems(readme, repo):
    """What the table leaves out or names wrongly: one line each (an empty list when the table is complete)."""
    rows = layout_rows(readme)
    named = {p: desc for cell, desc in rows.items() for p in re.findall(r"`([^`]+)`", cell)}
    problems = [f"the table names {p}, which is not in the repository" for p in named if not (repo / p).exists()]
    package = repo / "minispec"
    for path in sorted(package.glob("*.py")):
        if path.name != "__init__.py" and f"minispec/{path.name}" not in named:
            problems.append(f"no row names minispec/{path.name}")
    for folder in sorted(p for p in package.iterdir() if (p / "__init__.py").exists()):
        key = f"minispec/{folder.name}/"
        if key not in named:
            problems.append(f"no row names {key}")
            continue
        for module in sorted(folder.glob("*.py")):
            if module.name != "__init__.py" and f"`{module.name}`" not in named[key]:
                problems.append(f"the row of {key} does not list `{module.name}`")
    for kind, pattern in (("notebooks", "*.ipynb"), ("docs", "*.md")):
        for path in sorted((repo / kind).glob(pattern)):
            if f"{kind}/{path.name}" not in named:
                problems.append(f"no row names {kind}/{path.name}")
    return problems


def test_the_readme_layout_table_lists_every_module_folder_notebook_and_docs_page():
    assert layout_problems((REPO / "README.md").read_text(), REPO) == []


def test_the_layout_check_catches_a_missing_row_a_missing_module_and_a_stale_path():
    readme = (REPO / "README.md").read_text()
    no_hydra = "\n".join(line for line in readme.splitlines() if not line.startswith("| `notebooks/04_hydra.ipynb`"))
    assert layout_problems(no_hydra, REPO) == ["no row names notebooks/04_hydra.ipynb"]
    no_costs = readme.replace(" → `costs.py` (c(T), whole-step costs s(N), and the predicted speed-ups)", "")
    assert layout_problems(no_costs, REPO) == ["the row of minispec/speculative/ does not list `costs.py`"]
    stale = readme.replace("| `docs/errors.md` |", "| `docs/errors.md`, `docs/gone.md` |")
    assert layout_problems(stale, REPO) == ["the table names docs/gone.md, which is not in the repository"]


def import_order_problems(readme, repo):
    """Within each package folder, the modules its layout row lists in reading order: one line for every
    `from .module import` of a module listed later than the importer (the file tree is the reading order)."""
    problems = []
    for cell, desc in layout_rows(readme).items():
        folder = re.fullmatch(r"`(minispec/\w+/)`", cell)
        if not folder:
            continue
        order = list(dict.fromkeys(re.findall(r"`(\w+\.py)`", desc)))          # first mention, in order
        for module in order:
            for dep in re.findall(r"^from \.(\w+) import", (repo / folder.group(1) / module).read_text(), re.M):
                if f"{dep}.py" in order and order.index(f"{dep}.py") > order.index(module):
                    problems.append(f"{folder.group(1)}{module} imports {dep}.py, listed after it")
    return problems


def test_no_module_imports_one_its_folders_row_lists_after_it():
    assert import_order_problems((REPO / "README.md").read_text(), REPO) == []


def test_the_import_order_check_catches_a_module_listed_before_what_it_imports():
    readme = (REPO / "README.md").read_text()
    late = readme.replace(" → `lookup.py` (prompt lookup; its chain also joins the head decoders' dynamic trees)", "")
    late = late.replace("`draft_verify.py` → `registry.py`", "`draft_verify.py` → `lookup.py` → `registry.py`")
    assert late != readme
    assert import_order_problems(late, REPO) == ["minispec/decoders/medusa.py imports lookup.py, listed after it"]
