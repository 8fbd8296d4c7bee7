"""Table 4's variants as config.yaml runs them match their definitions in docs/unike.md."""

import re

import pytest

from tests.conftest import REPO
from unike.config import load_config, method_entry
from unike.editing import parse_hparams
from unike.method.editor import UniKEHparams

HEADER = "| Table 4 row | config entry | intrinsic | external | alpha | zeta |"


def documented_variants() -> dict[str, dict[str, str]]:
    """docs/unike.md's Table 4 definitions: config entry -> {column: cell}."""
    lines = (REPO / "docs" / "unike.md").read_text().splitlines()
    start = lines.index(HEADER)
    columns = [c.strip() for c in HEADER.strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
        rows[re.sub(r"`", "", cells.pop("config entry"))] = cells
    return rows


def matches(hparams: UniKEHparams, definition: dict[str, str]) -> bool:
    alpha = {"adaptive": hparams.alpha is None, "fixed": isinstance(hparams.alpha, float),
             "-": hparams.alpha is None}[definition["alpha"]]
    return (alpha and str(hparams.intrinsic).lower() == definition["intrinsic"]
            and hparams.external == definition["external"] and hparams.zeta == definition["zeta"])


def test_the_docs_define_the_five_rows():
    assert set(documented_variants()) == {"unike-only-intrin", "unike-only-latent-ike", "unike-intrin+ike",
                                          "unike-intrin+latent-ike", "unike"}


@pytest.mark.parametrize("name", sorted(documented_variants()))
def test_each_table4_variant_runs_as_defined_on_every_backbone(name):
    config = load_config(REPO / "config.yaml")
    definition = documented_variants()[name]
    for backbone in config["backbones"]:
        entry = method_entry(config, name, backbone)
        assert entry["editor"] == "unike.method.editor:UniKE"
        hparams = parse_hparams(UniKEHparams, entry["hparams"], name)
        assert matches(hparams, definition), (name, backbone, hparams, definition)


def test_a_variant_with_the_collaboration_left_in_does_not_match():
    definition = documented_variants()["unike-only-intrin"]
    assert not matches(UniKEHparams(external="none"), definition)  # keeps zeta: the old only-intrin
    assert not matches(UniKEHparams(intrinsic=False), documented_variants()["unike-only-latent-ike"])  # adaptive alpha
