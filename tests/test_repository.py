"""The repository stands alone and what it documents runs as written."""
import ast
import re
import subprocess
import sys

from conftest import REPO

TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".txt", ".json", ".cfg", ".yml", ".yaml", ".sh", ""}
# What a file of this repository may not cite: notes that are not in it, and paths of one machine.
FORBIDDEN = re.compile(r"DESIGN\.md|STYLE\.md|\.\./shared\b|(?<![\w.])/(?:work|root|home)/|/tmp/\S*venv"
                       r"|(?<![\w.])/\S*venv/bin/python")


def tracked_text_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, out):
        path = REPO / name
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path.stat().st_size < 2_000_000:
            yield name, path


def test_no_file_cites_notes_outside_the_repository_or_a_path_of_one_machine():
    me = "tests/test_repository.py"
    hits = []
    for name, path in tracked_text_files():
        if name == me:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{name}:{i}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def test_the_forbidden_pattern_catches_what_it_is_meant_to():
    # the examples are put together from pieces, so that this file itself cites nothing outside the repository
    design, style, shared, work, venv = "DESIGN" + ".md", "STYLE" + ".md", ".." + "/shared", "/" + "work", "v" + "env"
    for bad in (f"see {design}", f"({style} #2)", f"{shared}/{design}", f"`{work}/shared/x`", "/" + "root/.cache",
                f"{work}/{venv}/bin/python tools/x.py", f"/opt/x/.{venv}/bin/python -m pytest"):
        assert FORBIDDEN.search(bad), bad
    for ok in ("docs/design.md", "python tools/make_reference.py", "data/corpus/train.txt", "a/workbench"):
        assert not FORBIDDEN.search(ok), ok


def test_the_license_is_the_apache_2_text_and_pyproject_says_so_in_spdx():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "9. Accepting Warranty or Additional Liability" in text
    py = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2.0"$', py, re.M)
    assert re.search(r'^license-files = \["LICENSE"\]$', py, re.M)


def test_no_module_of_the_package_needs_tqdm():
    """tqdm is not a runtime dependency: the package's progress bars are minispec.training.progress."""
    paths = sorted((REPO / "minispec").rglob("*.py"))
    assert any(p.parent.name == "training" for p in paths)        # the subfolders are walked too
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "tqdm" for n in names), path.name


def readme_python_blocks():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_readme_python_blocks_run_as_written():
    blocks = readme_python_blocks()
    assert blocks
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, code + "\n" + r.stderr


def test_the_readme_names_only_decoders_that_are_registered():
    from minispec.decoders.registry import DECODERS
    text = (REPO / "README.md").read_text()
    for m in re.finditer(r"--decoder (\w+)", text):
        assert m.group(1) in DECODERS, m.group(0)


def test_the_docs_say_the_shipped_heads_are_stored_as_they_are():
    import json
    from safetensors import safe_open
    with safe_open(str(REPO / "weights/stdlib-mistral/medusa/medusa_heads.safetensors"), "np") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    doc = (REPO / "docs" / "medusa.md").read_text()
    assert "`medusa_heads.safetensors` (float32)" not in doc
    assert json.loads((REPO / "weights/stdlib-mistral/medusa/medusa_config.json").read_text())["kind"] == "medusa"


def test_the_built_in_progress_bar_counts_and_prints_one_summary_line_off_a_terminal():
    import io
    from minispec.training.progress import Progress
    out = io.StringIO()                             # not a tty: no redraws, one line at the end
    seen = list(Progress(range(7), desc="hidden states", unit="seq", file=out))
    assert seen == list(range(7))
    bar = Progress(total=10, desc="train heads", unit="step", file=out)
    for _ in range(4):
        bar.update(1)
    bar.set_postfix(loss="2.500")
    bar.close()
    bar.close()                                     # closing twice prints once
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("hidden states: 100% 7/7 seq")
    assert lines[1].startswith("train heads:  40% 4/10 step") and lines[1].endswith("loss=2.500]")
    Progress(total=3, disable=True, file=out).close()
    assert len(out.getvalue().splitlines()) == 2
