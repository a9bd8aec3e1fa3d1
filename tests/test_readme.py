"""README.md is a newcomer's map: small, every file it points to exists, the generated results table has its
markers, and it cites nothing outside the repository."""
import re

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_is_small():
    assert len(README.encode()) <= 12_000


def test_every_path_in_the_readme_exists():
    generated = ("data/", "results/quick/")  # MNIST's download folder and --quick's output
    paths = {p for p in re.findall(r"`([\w./-]+\.(?:py|md|json|sh|txt)|[\w-]+/)`", README) if p not in generated}
    paths |= set(re.findall(r"`(?:python |\.venv/bin/python )?([\w/-]+\.py)", README))
    missing = sorted(p for p in paths if not (REPO / p).exists() and not (REPO / "quant" / p).exists())
    assert missing == [] and len(paths) > 20


def test_generated_table_and_no_dangling_references():
    assert README.count("<!-- BEGIN:results_table -->") == README.count("<!-- END:results_table -->") == 1
    assert "METHODS.md" not in README
    headings = set(re.findall(r"^#+ (.+)$", README, re.M))
    for section in re.findall(r"""(?:see|README) ["'“]([^"'”]+)["'”]""", README):  # "see 'X'" names a section
        assert section in headings, section
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert (REPO / target).exists(), target
