"""The documentation ships with the repository and stays true to it:

* every link in README.md and docs/ resolves (files, and #anchors to their headings);
* every `docs/<page>.md` a message or docstring in the package names exists;
* nothing refers to a file outside the repository (the developers' design notes are not shipped);
* every dataset layout the data registry prints in its errors is on a docs page, word for word;
* the Python examples of README.md and docs/python.md run, on the tiny random model and the
  digits (the substitutions below are the only changes made to them).
"""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").glob("*.md"))

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(path: Path) -> str:
    return FENCE.sub("", path.read_text())  # links inside code blocks are code, not links


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in _prose(path).splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return out


@pytest.mark.parametrize("page", [REPO / "README.md", *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert broken == []


def test_every_docs_page_the_package_names_exists():
    named = set()
    for path in [*(REPO / "fastprompt").rglob("*.py"), *(REPO / "kernels").rglob("*.py"), REPO / "README.md"]:
        named |= {(m, str(path.relative_to(REPO))) for m in re.findall(r"docs/[\w-]+\.md", path.read_text())}
    missing = sorted((page, where) for page, where in named if not (REPO / page).exists())
    assert named and missing == []


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the files that matter
        return [p for d in ("fastprompt", "kernels", "docs", "tests", "benchmarks", "configs") for p in (REPO / d).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts] + [REPO / "README.md", REPO / "Makefile"]


def test_nothing_refers_to_files_outside_the_repository():
    outside = re.compile(r"\.\./shared|shared/design|\b(?:DEPT|DPL|PROTOCOLS|ARCHITECTURE|STACK|PROMPTSRC)\.md\b")
    offenders = []
    for path in _tracked_files():
        rel = str(path.relative_to(REPO))
        if rel == "tests/test_docs.py" or path.suffix in (".png", ".json"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if outside.search(line)]
    assert offenders == []


def test_every_dataset_layout_is_documented():
    from fastprompt.data import DATASETS

    docs = "\n".join(p.read_text() for p in PAGES)
    assert [name for name, spec in DATASETS.items() if spec.layout not in docs] == []


# ------------------------------------------------------------------------ examples that run

TINY = ["model.name=fastprompt-tiny", "model.pretrained=null", "data.seeds=[1]", "data.shots=2", "train.epochs=1",
        "train.batch_size=4", "train.precision=fp32", "train.device=cpu", "train.num_workers=0", "train.progress=false"]
# (what the example says, what the test runs instead): the real weights, GPU and data are not here.
SUBSTITUTIONS = [
    ('load_clip("ViT-B-16-quickgelu", pretrained="openai", dtype="bf16", device="cuda")',
     'load_clip("fastprompt-tiny", pretrained=None, dtype="fp32", device="cpu")'),
    ('dataset="caltech101", overrides=["data.root=/data"]',
     'dataset="imagefolder", overrides=[f"data.root={DIGITS}", *TINY, f"output_dir={OUT}"]'),
]


def _examples(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from fastprompt.data import write_digits_imagefolder

    return write_digits_imagefolder(tmp_path_factory.mktemp("digits") / "data", image_size=32)


@pytest.mark.parametrize("page", ["README.md", "docs/python.md"])
def test_python_examples_run(page, digits, tmp_path):
    examples = _examples(REPO / page)
    assert len(examples) == 2  # one for models, one for training
    for line, code in examples:
        used = [new for old, new in SUBSTITUTIONS if old in code]
        assert used, f"{page}:{line}: an example the test cannot run here (add its substitution)"
        for old, new in SUBSTITUTIONS:
            code = code.replace(old, new)
        namespace = {"DIGITS": digits, "TINY": TINY, "OUT": tmp_path / f"run{line}"}
        exec(compile(code, f"{page}:{line}", "exec"), namespace)
        if "results" in namespace:  # the training example really trained and evaluated
            assert namespace["again"]["mean"] == namespace["results"]["mean"]
            assert set(namespace["results"]["mean"]) == {"base", "new", "hm"}
        else:
            assert namespace["logits"].shape == (4, 2)
