"""The markdown files: every relative link leads to a file of the repository, and every #anchor to a heading there;
the tools' --help."""

import ast
import re
import subprocess
import sys

from conftest import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    headings = [line.lstrip("#") for line in path.read_text().splitlines() if re.match(r"#{1,6} ", line)]
    return {github_anchor(heading) for heading in headings}


def test_every_relative_link_of_every_markdown_file_works():
    tracked = subprocess.check_output(["git", "ls-files", "*.md"], cwd=ROOT, text=True).split()
    assert "README.md" in tracked and len(tracked) > 3
    broken = []
    for name in tracked:
        page = ROOT / name
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:: not this test's business
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_read_in_two_minutes():
    assert len((ROOT / "README.md").read_text().split()) < 1500


def test_the_tools_help_shows_one_default_per_flag():
    """A field whose docstring gives its default (the task's time limit, this checkout's HEAD) shows no "None" too."""
    for tool in ["evaluate_model.py", "plot.py", "benchmarks/learning/record.py"]:
        helped = subprocess.run(
            [sys.executable, str(ROOT / tool), "--help"], capture_output=True, text=True, check=False
        )
        assert helped.returncode == 0 and "(default: " in helped.stdout, helped.stderr[-2000:]
        flat = " ".join(helped.stdout.replace("│", " ").split())
        assert ") (default: None)" not in flat, f"{tool}: two defaults for one flag"


def test_every_flag_is_described_in_one_unbroken_line():
    """tyro keeps a field docstring's line breaks, so a docstring wrapped in the source breaks --help mid-sentence."""
    tools = ["drqv2_continuous_action.py", "taco_continuous_action.py", "evaluate_model.py", "plot.py"]
    tools += [str(path.relative_to(ROOT)) for path in sorted((ROOT / "benchmarks").rglob("*.py"))]
    broken = []
    for tool in tools:
        for node in ast.walk(ast.parse((ROOT / tool).read_text())):
            if isinstance(node, ast.ClassDef) and node.name == "Args":
                fields = zip(node.body, node.body[1:])
                for field, text in fields:
                    described = isinstance(text, ast.Expr) and isinstance(text.value, ast.Constant)
                    if isinstance(field, ast.AnnAssign) and described and "\n" in text.value.value:
                        broken.append(f"{tool}: --{field.target.id.replace('_', '-')}")
    assert len(tools) > 8 and not broken, broken
