"""Bind features to the trigger: find the tags that describe what the character *is*, so they can be removed.

A LoRA learns what the captions do not explain. If every picture says "blue eyes, long hair", the model ties
those to the words "blue eyes" and "long hair", and the trigger alone will not bring them back. Removing them
(after the user confirms) makes the trigger carry them.

What counts as intrinsic here: traits that stay the same in every picture of the character whatever it wears,
does or feels — eye colour and shape, hair colour, length and style, skin colour, permanent marks (freckles,
moles, scars, tattoos), face details (nose, lips, fangs), ears, breast size, build, and non-human parts (tails,
horns, wings, halos). What is kept in the captions on purpose:
- clothes and accessories (hair ribbons, glasses, fake animal ears): removable, so prompts can change them;
- expression (smile, blush, open mouth), pose, action, framing, lighting, background, objects: they vary;
- count, gender and age tags (1girl, solo, male focus, child): they are the class the trigger belongs to, and
  prompts rely on them for composition;
- states that come and go (wet hair, floating hair, messy makeup).
Patterns are matched on booru-style tags, case-insensitive, with spaces or underscores.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..common.errors import ConfigError
from ..common.i18n import N_, tr
from ..dataset.captions import split_tags

_SHADE = r"(?:(?:light|dark|pale|bright|deep|platinum|ash|strawberry|dirty) )?"
_COLOUR = (r"(?:aqua|black|blonde|blond|blue|brown|green|grey|gray|orange|pink|purple|red|silver|white|yellow"
           r"|golden|gold|amber|lavender|violet|teal|cyan|magenta|beige|crimson|navy)")

# (kind, pattern): each pattern must match the whole tag, spaces standing for spaces or underscores.
_FEATURES: tuple[tuple[str, str], ...] = (
    (N_("eye colour"), rf"{_SHADE}{_COLOUR} eyes|(?:multicolored|gradient|two-tone) eyes|heterochromia"),
    (N_("eye shape"), r"tsurime|tareme|slit pupils|ringed eyes|(?:long |thick |colored )?eyelashes"),
    (N_("hair colour"), rf"{_SHADE}{_COLOUR} hair|(?:multicolored|two-tone|gradient|streaked|split-color|colored inner"
                    r"|rainbow) hair|colored tips|(?:\w+ )?streaks"),
    (N_("hair length"), r"(?:very |absurdly )?(?:long|short) hair|medium hair"),
    (N_("hair style"), r"(?:low |short |long )?twintails|(?:high |low |side )?ponytail|(?:twin |single |side |french |"
                   r"crown )?braids?|braided (?:ponytail|bangs|bun)|(?:double |single )?(?:hair )?buns?|"
                   r"(?:blunt |swept |parted |asymmetrical |crossed |choppy |arched )?bangs|ahoge|sidelocks|"
                   r"hair intakes|drill hair|twin drills|(?:bob|hime|pixie) cut|(?:two|one) side up|"
                   r"hair between eyes|hair over (?:one eye|eyes)|(?:wavy|curly|straight|spiked|spiky|fluffy) hair|"
                   r"undercut|mohawk|bald|dreadlocks|afro|antenna hair|hair flaps"),
    (N_("face"), r"(?:facial|forehead|cheek) marks?|whisker markings|beauty mark|(?:pointy|button|big|small|long) nose|"
             r"(?:thick|full|thin) lips"),
    (N_("teeth"), r"fangs?|skin fangs?|fang out|(?:sharp|pointy|shark) teeth"),
    (N_("skin"), rf"(?:dark|pale|tan|tanned|brown|olive|colored|{_COLOUR}) skin|dark-skinned (?:female|male)|tan|tanned"),
    (N_("skin mark"), r"freckles|moles?(?: (?:under|on|above|below) [\w ]+)?|scars?(?: (?:on|across|over) [\w ]+)?|"
                  r"(?:[\w-]+ )?tattoos?"),
    (N_("ears"), r"(?:animal|cat|dog|fox|wolf|rabbit|bunny|horse|cow|mouse|bear|tiger|lion|raccoon|squirrel|"
             r"sheep|goat|deer|bat) ears|animal ear fluff|(?:long )?pointy ears|elf ears"),
    (N_("body"), r"flat chest|(?:small|medium|large|huge|gigantic) breasts|muscular(?: female| male)?|toned"),
    # Not "fake wings" (a costume) nor "holding tail" / "spreading wings" (actions).
    (N_("non-human parts"), r"(?!fake |[\w-]+ing )(?:[\w-]+ )?(?:tails?|horns?|wings?)|halo"),
)
_COMPILED = tuple((kind, re.compile(pattern)) for kind, pattern in _FEATURES)


@dataclass(frozen=True)
class Proposal:
    tag: str
    count: int  # images having the tag
    reason: str


def feature_kind(tag: str) -> str | None:
    """The kind of intrinsic feature a tag describes ("hair colour", ...), or None."""
    normalized = _normalize(tag)
    return next((kind for kind, pattern in _COMPILED if pattern.fullmatch(normalized)), None)


def propose_feature_tags(
    frequency: Iterable[tuple[str, int]],
    image_count: int,
    trigger_words: str | Sequence[str],
    min_fraction: float = 0.5,
) -> list[Proposal]:
    """Feature tags present in at least ``min_fraction`` of the images, most frequent first; never a trigger word.

    ``frequency`` is (tag, images having it), as ``CaptionSet.tag_frequency()`` gives it; ``trigger_words`` a
    list or the comma-separated setting.
    """
    if not 0 < min_fraction <= 1:
        raise ConfigError(tr("The share of images for a feature tag must be above 0 and at most 1, not "
                             "{min_fraction}.", min_fraction=min_fraction))
    if image_count <= 0:
        return []
    triggers = split_tags(trigger_words) if isinstance(trigger_words, str) else trigger_words
    protected = {_normalize(word) for word in triggers}
    proposals = []
    for tag, count in frequency:
        kind = feature_kind(tag)
        if kind is None or count < min_fraction * image_count or _normalize(tag) in protected:
            continue
        reason = tr("{kind}, in {count} of {image_count} images ({share:.0%})", kind=tr(kind), count=count,
                    image_count=image_count, share=count / image_count)
        proposals.append(Proposal(tag, count, reason))
    return sorted(proposals, key=lambda proposal: (-proposal.count, proposal.tag))


def _normalize(tag: str) -> str:
    return " ".join(tag.replace("_", " ").lower().split())
