"""The released checkpoints whose files cirlab can recognise, and the numbers their authors report.

An import records each source file's SHA-1 (the hash the authors publish); ``cirlab eval`` of an
imported folder looks it up here and prints the reported numbers beside its own, so a user sees
at once whether the reproduction holds. Only releases with a published hash can be recognised;
docs/models.md lists every release, hashed or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Release:
    method: str
    dataset: str
    sha1: dict[str, str]  # file name -> SHA-1 published by the authors
    published: str  # where the authors publish the files (as text)
    split: str = "val"  # the split of the reported numbers
    reported: dict[str, float] = field(default_factory=dict)  # cirlab's metric names
    reported_by: str = ""


RELEASES = [
    Release("Bi-BLIP4CIR", "fashioniq",
            {"combiner.pt": "4a1ba45bf52033c245c420b30873f68bc8e60732",
             "tuned_blip_best.pt": "80f0db536f588253fca416af83cb50fab709edda"},
            "Cuberick-Orion/Bi-Blip4CIR README (OneDrive links)",
            reported={"dress/R@10": 42.09, "dress/R@50": 67.33, "shirt/R@10": 41.76, "shirt/R@50": 64.28,
                      "toptee/R@10": 46.61, "toptee/R@50": 70.32, "avg/R@10": 43.49, "avg/R@50": 67.31},
            reported_by="the Bi-BLIP4CIR paper's FashionIQ table as listed by third parties (not checked against "
                        "the paper here)"),
    Release("Bi-BLIP4CIR", "cirr",
            {"combiner_mean.pt": "327703361117400de83936674d5c3032af37bd7a",
             "tuned_blip_mean.pt": "67dca8a1905802cfd4cd02f640abb0579f1f88fd"},
            "Cuberick-Orion/Bi-Blip4CIR README (OneDrive links)", split="test1",
            reported={"R@1": 40.15, "R@5": 73.08, "R@10": 83.88, "R@50": 96.27},
            reported_by="the Bi-BLIP4CIR paper's CIRR test table as listed by third parties (not checked against "
                        "the paper here); test1 is scored by the CIRR server"),
    Release("BLIP (pre-trained)", "", {"model_base.pth": "5f1d8cdfae91e22a35e98a4bbb4c43be7bd0ac50"},
            "salesforce/BLIP (the hash as Bi-Blip4CIR's README gives it)"),
]


def release_of(provenance: dict | None) -> Release | None:
    """The release one of an imported folder's source files is, by its SHA-1."""
    hashes = {v.get("sha1") for v in (provenance or {}).values() if isinstance(v, dict)}
    for release in RELEASES:
        if hashes & set(release.sha1.values()):
            return release
    return None
