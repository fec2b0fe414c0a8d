"""The tangler itself, on temporary books, and the real book against src/."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("tangle", ROOT / "book" / "_ext" / "tangle.py")
tangle = importlib.util.module_from_spec(spec)
sys.modules["tangle"] = tangle  # dataclasses look their module up here
spec.loader.exec_module(tangle)

FRONT = "---\njupytext:\n  text_representation:\n    format_name: myst\n---\n\n"


def cell(body: str, target: str | None = None, yaml_block: bool = False) -> str:
    if target is None:
        options = ""
    elif yaml_block:
        options = f"---\ntangle: {target}\n---\n"
    else:
        options = f":tangle: {target}\n"
    return f"```{{code-cell}} ipython3\n{options}{body}\n```\n"


def make_book(root: Path, chapters: dict[str, str]) -> Path:
    (root / "book").mkdir(parents=True, exist_ok=True)
    for name, text in chapters.items():
        (root / "book" / name).write_text(FRONT + text)
    return root


def test_blocks_go_in_chapter_order_with_provenance(tmp_path):
    root = make_book(tmp_path, {
        "02_second.md": "text\n\n" + cell("B = 2", "src/scratchlm/m.py"),
        "01_first.md": "# One\n\n" + cell("A = 1", "src/scratchlm/m.py") + "\n" + cell("print('demo')")
        + "\n" + cell("C = 3", "src/scratchlm/other.py", yaml_block=True),
    })
    tangle.write(root)
    module = (root / "src/scratchlm/m.py").read_text()
    assert module.index("A = 1") < module.index("B = 2")
    assert "# book/01_first.md:9\nA = 1" in module and "# book/02_second.md:9\nB = 2" in module
    assert "Edit book/01_first.md, book/02_second.md" in module
    assert "print('demo')" not in module
    assert "C = 3" in (root / "src/scratchlm/other.py").read_text()


def test_provenance_line_is_the_cell_fence_line(tmp_path):
    root = make_book(tmp_path, {"01_a.md": "x\n" * 5 + cell("def f():\n    return 1", "src/scratchlm/f.py")})
    tangle.write(root)
    fence_line = (root / "book/01_a.md").read_text().splitlines().index("```{code-cell} ipython3") + 1
    assert f"# book/01_a.md:{fence_line}\n" in (root / "src/scratchlm/f.py").read_text()


def test_tangling_twice_changes_nothing(tmp_path):
    root = make_book(tmp_path, {"01_a.md": cell("X = 1", "src/scratchlm/x.py")})
    assert tangle.write(root) == [root / "src/scratchlm/x.py"]
    assert tangle.write(root) == []
    assert tangle.check(root) == []


def test_check_names_stale_hand_edited_missing_and_orphaned_files(tmp_path):
    root = make_book(tmp_path, {"01_a.md": cell("X = 1", "src/scratchlm/x.py") + cell("Y = 1", "src/scratchlm/y.py")})
    tangle.write(root)
    # stale: the chapter changed after tangling
    (root / "book/01_a.md").write_text(FRONT + cell("X = 2", "src/scratchlm/x.py") + cell("Y = 1", "src/scratchlm/y.py"))
    # hand-edited: the module changed after tangling
    y = root / "src/scratchlm/y.py"
    y.write_text(y.read_text().replace("Y = 1", "Y = 99"))
    (root / "src/scratchlm/extra.py").write_text("Z = 1\n")
    problems = "\n".join(tangle.check(root))
    assert "stale: src/scratchlm/x.py" in problems and "+X = 2" in problems
    assert "hand-edited: src/scratchlm/y.py" in problems and "-Y = 99" in problems
    assert "orphaned: src/scratchlm/extra.py" in problems
    (root / "src/scratchlm/x.py").unlink()
    assert "missing: src/scratchlm/x.py" in "\n".join(tangle.check(root))


def test_write_removes_only_tangled_orphans(tmp_path):
    root = make_book(tmp_path, {"01_a.md": cell("X = 1", "src/scratchlm/x.py") + cell("G = 1", "src/scratchlm/gone.py")})
    tangle.write(root)
    (root / "src/scratchlm/hand.py").write_text("H = 1\n")
    (root / "book/01_a.md").write_text(FRONT + cell("X = 1", "src/scratchlm/x.py"))
    tangle.write(root)
    assert not (root / "src/scratchlm/gone.py").exists()
    assert (root / "src/scratchlm/hand.py").exists()  # never delete what a person wrote


def test_bad_targets_and_unclosed_cells_are_errors(tmp_path):
    root = make_book(tmp_path, {"01_a.md": cell("X = 1", "elsewhere/x.py")})
    with pytest.raises(tangle.TangleError, match="must look like"):
        tangle.tangle(root)
    make_book(tmp_path, {"01_a.md": "```{code-cell} ipython3\n:tangle: src/scratchlm/x.py\nX = 1\n"})
    with pytest.raises(tangle.TangleError, match="never closed"):
        tangle.tangle(root)


def test_check_cli_exits_nonzero_on_drift(tmp_path):
    root = make_book(tmp_path, {"01_a.md": cell("X = 1", "src/scratchlm/x.py")})
    script = ROOT / "book/_ext/tangle.py"
    run = lambda *a: subprocess.run([sys.executable, str(script), "--root", str(root), *a], capture_output=True, text=True)
    assert run("--check").returncode == 1
    assert run().returncode == 0
    assert run("--check").returncode == 0


def test_real_book_and_src_are_in_sync():
    assert tangle.check(ROOT) == []


def test_every_module_in_the_package_is_tangled():
    produced = set(tangle.tangle(ROOT))
    on_disk = {p for p in (ROOT / "src/scratchlm").rglob("*.py") if "__pycache__" not in p.parts}
    assert on_disk == produced
    for path in on_disk:
        assert path.read_text().startswith(tangle.HEADER_MARK)
