"""Packaging and loaders: no generic top-level names installed, no machine paths, strict weights."""
import configparser
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_only_pml_ext_is_installed():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    assert include and all(p == "pml_ext" or p.startswith("pml_ext.") for p in include), include
    assert "options.entry_points" not in cfg or "benchmarks" not in cfg["options.entry_points"].get(
        "console_scripts", "")


def test_numba_is_a_dependency():
    """EE's compiled CPU kernels come with a plain install (the speed targets are met with them)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = cfg["options"]["install_requires"].split()
    assert any(r.startswith("numba>=") for r in requires), requires


def test_no_machine_paths_in_the_library():
    pattern = re.compile(r"/(work|home|tmp|Users)/")
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for p in (ROOT / "pml_ext").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not hits


@pytest.fixture(scope="module")
def googlenet_state():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_googlenet_loader_is_strict(tmp_path, googlenet_state):
    from benchmarks.models import googlenet_trunk

    good = tmp_path / "good.pth"
    torch.save(googlenet_state, good)
    trunk, size = googlenet_trunk(str(good))
    assert size == 1024
    w = "conv1.conv.weight"
    assert torch.equal(trunk.state_dict()[w], googlenet_state[w])

    missing = dict(googlenet_state)
    del missing["inception5b.branch1.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"1 missing keys \['inception5b.branch1.conv.weight'\]"):
        googlenet_trunk(str(tmp_path / "missing.pth"))

    renamed = {"module." + k: v for k, v in googlenet_state.items()}  # a DataParallel checkpoint
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match="unexpected keys"):
        googlenet_trunk(str(tmp_path / "renamed.pth"))

    torch.save({"state_dict": googlenet_state}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match="not a GoogLeNet state_dict"):
        googlenet_trunk(str(tmp_path / "nested.pth"))
