"""The README is a contract: its example runs, its table is the code's, CI runs its command."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import pytest

from resnet_jax.summary import summarize

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_after(marker: str) -> str:
    match = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", README, re.S)
    assert match, f"README has no python block after {marker!r}"
    return match.group(1)


def test_custom_block_example_plugs_into_resnet_and_takes_a_gradient_step():
    scope: dict = {}
    exec(compile(fenced_after("<!-- readme-example: custom-block -->"), "README.md", "exec"), scope)
    assert np.isfinite(scope["loss"])
    params, grads = scope["params"], scope["grads"]
    # the custom block is really used: its scalar exists in every block and receives a gradient
    assert params["stage2"]["block0"]["alpha"].shape == ()
    assert params["stage2"]["blocks"]["alpha"].shape == (2,)
    assert float(jax.numpy.abs(grads["stage3"]["block0"]["alpha"])) > 0


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "python -m pytest" in line).strip()
    install = re.search(r'pip install --quiet (-e "\.\[[a-z,]+\]")', ci).group(1)
    assert f"pip install {install} && {command}" in README


def table_rows():
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"(resnet|plain)\d+", cells[0]):
            yield cells[0], int(cells[2].replace(",", "")), cells[3]


@pytest.mark.parametrize("name, params, mult_adds", list(table_rows()))
def test_model_table_matches_the_code(name, params, mult_adds):
    s = summarize(name)
    assert s.params == params
    value, unit = mult_adds.split()
    scale = {"M": 1e6, "G": 1e9}[unit]
    last_digit = 10.0 ** -len(value.partition(".")[2]) * scale
    assert abs(s.mult_adds - float(value) * scale) <= last_digit / 2


def test_local_links_and_images_exist():
    targets = re.findall(r"\]\(([^)#\s]+)\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links to files of the repository"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_layout_section_names_every_part_of_the_tree():
    layout = re.search(r"## Layout\s*```\n(.*?)```", README, re.S).group(1)
    named = {line.split()[0].rstrip("/").removesuffix("/*.py") for line in layout.splitlines()
             if line.strip() and not line.startswith(" ")}
    package = {f"resnet_jax/{p.name}" for p in (ROOT / "resnet_jax").iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py")
               or (p.is_dir() and (p / "__init__.py").exists())}
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
           and p.name not in ("resnet_jax", "runs", "build") and not p.name.endswith(".egg-info")
           and any(p.rglob("*.py")) | any(p.glob("*.md")) | any(p.glob("*.png"))}
    missing = sorted((package | top | {"train.py"}) - named)
    assert not missing, f"README's Layout does not name {missing}"
