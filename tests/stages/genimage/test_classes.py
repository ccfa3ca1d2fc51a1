"""ImageNet classes of GenImage file names: the LaRE reference's four rules and its class texts."""

import json
import re

import pytest

from stages.genimage import classes
from tests.helpers import ROOT

ANNS = ROOT.parent / "shared" / "reference" / "lare_anns"


@pytest.mark.parametrize(
    "name, text",
    [
        # (d) a synset prefix: ImageNet train files (GenImage's train/nature)
        ("train/nature/n01440764_10026.JPEG", "tench"),
        ("n01494475_1.JPEG", "hammerhead"),  # not the newer "hammerhead shark"
        ("n01514668_7.JPEG", "cock"),  # not "rooster"
        ("n01558993_3.JPEG", "robin"),  # not "American robin"
        # (a) at most 3 characters: the class index of generated files
        ("val/ai/1_sdv4_00003.png", "goldfish"),
        ("4_adm_12.PNG", "hammerhead"),
        ("123_sdv5_00001.png", "spiny lobster"),
        ("999_wukong_1.png", "toilet tissue"),
        # (b) ImageNet validation files through the 50,000-entry ground truth (all of GenImage's val/nature)
        ("val/nature/ILSVRC2012_val_00042597.JPEG", "beach wagon"),
        ("ILSVRC2012_val_00000001.JPEG", "sea snake"),
        # (c) GLIDE and VQDM: the class index is the 5th field
        ("GLIDE_1000_200_08_808_glide_00138.png", "sombrero"),
        ("VQDM_1000_200_00_7_vqdm_00001.png", "cock"),
    ],
)
def test_the_reference_rules_and_names(name, text):
    assert classes.class_name(name) == text


@pytest.mark.parametrize(
    "name",
    [
        "midjourney_abc.png",  # no rule fits: the reference raises, we fall back to the fixed prompt
        "1000_x.png",  # 4 characters, not a synset
        "abc_1.png",  # 3 characters, not a number
        "GLIDE_1000.png",  # no 5th field
        "ILSVRC2012_val_00050001.JPEG",  # outside the validation set
        "n99999999_1.JPEG",  # unknown synset
        "photo.png",
    ],
)
def test_names_without_a_class(name):
    assert classes.class_name(name) is None


def test_fallback_rows_are_listed():
    prompts, idx, missing = classes.prompts_for(
        "a photo", "a photo of a {cls}", ["4_x.png", "dog.png", "n01440764_1.JPEG"]
    )
    assert missing == [1]
    assert [prompts[i] for i in idx] == ["a photo of a hammerhead", "a photo", "a photo of a tench"]
    assert classes.prompts_for("a photo", None, ["4_x.png"])[2] == []


@pytest.mark.skipif(not ANNS.is_dir(), reason=f"the reference annotations are not at {ANNS}")
def test_packaged_tables_are_the_reference_annotations():
    """Every class text, synset and validation label equals the reference's `anns/` files."""
    names = json.loads((ANNS / "idx_to_clsname.json").read_text())
    folders = dict(
        (int(m.group(1)), m.group(2))
        for m in re.finditer(r"mv (\d+)/ (n\d{8})/", (ANNS / "idx_to_folder.txt").read_text())
    )
    assert classes.names() == [names[str(k)].split(",")[0].strip() for k in range(1000)]
    assert classes.synsets() == [folders[k] for k in range(1000)]
    index_of = {w: k for k, w in folders.items()}
    val = json.loads((ANNS / "filename_to_folder.json").read_text())
    assert len(val) == classes.N_VAL
    assert all(classes.class_index(f) == index_of[w] for f, w in val.items())
