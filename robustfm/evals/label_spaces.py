"""The classes a zero-shot classifier chooses among: those present in the data, or all of ImageNet-1k.

- ``present``: the classes the evaluated images carry, in label order (the data's ``class_name`` is the prompt).
- ``imagenet1k``: the 1,000 ImageNet classes in their standard order, prompted by their first lemma from
  ``timm.data.ImageNetInfo`` ("tench" for ``n01440764``). A data class maps to ImageNet by its ``class_name``: a
  WordNet id (``n01440764``) or one of the class's lemmas (case-insensitive; a lemma shared by two ImageNet classes,
  such as "crane", must be given as a WordNet id). A class that maps nowhere fails, naming it.

``resolve_label_space`` runs on the driver before any actor starts; its result goes to the actors as plain data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

LABEL_SPACES = ("present", "imagenet1k")
_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class LabelSpace:
    """Attributes:
    class_names: the prompt name of each class (logit column ``i`` is ``class_names[i]``).
    index_of: data label -> logit column of its class.
    """

    class_names: list[str]
    index_of: dict[int, int]


def resolve_label_space(space: str, present: Mapping[int, str]) -> LabelSpace:
    """The label space ``space`` for data whose classes are ``present`` (``{label: class_name}``).

    Raises:
        ValueError: an unknown space, or (``imagenet1k``) data classes that name no ImageNet class.
    """
    if space == "present":
        return LabelSpace(list(present.values()), {label: index for index, label in enumerate(present)})
    if space != "imagenet1k":
        raise ValueError(f"label_space {space!r} is unknown; choose one of {list(LABEL_SPACES)}")
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = [info.index_to_label_name(i) for i in range(info.num_classes())]
    lemmas = [[part.strip() for part in info.index_to_description(i).split(",")] for i in range(len(wnids))]
    by_lemma: dict[str, set[int]] = {}
    for index, names in enumerate(lemmas):
        for name in names:
            by_lemma.setdefault(name.lower(), set()).add(index)
    by_wnid = {wnid: index for index, wnid in enumerate(wnids)}
    index_of, problems = {}, []
    for label, name in present.items():
        text = name.strip()
        if _WNID.match(text) and text in by_wnid:
            index_of[label] = by_wnid[text]
            continue
        found = by_lemma.get(text.lower(), set())
        if len(found) == 1:
            index_of[label] = next(iter(found))
        elif found:
            ids = ", ".join(sorted(wnids[i] for i in found))
            problems.append(f"{name!r} (label {label}) is a lemma of several ImageNet classes ({ids}): use the wnid")
        else:
            problems.append(f"{name!r} (label {label}) is neither an ImageNet wnid nor one of its class lemmas")
    if problems:
        raise ValueError("label_space imagenet1k: " + "; ".join(problems))
    return LabelSpace([names[0] for names in lemmas], index_of)
