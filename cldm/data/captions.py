"""Captions as kohya's sd-scripts reads and varies them (library/train_util.py), for the kohya reader.

Reading: a caption file's first line, stripped (with `enable_wildcard` all its non-empty lines, one chosen per
step). `.txt` and `.caption` stand in for each other: the other is read when the named extension is absent.

Per step, in kohya's order: `caption_prefix` / `caption_suffix` joined with a space; the whole caption dropped
(empty) with `caption_dropout_rate`; wildcards `{a|b|c}` replaced by one choice (`enable_wildcard`); then, with
`shuffle_caption` or `caption_tag_dropout_rate`, the caption is cut into tags at `caption_separator`, the first
`keep_tokens` tags (or those before `keep_tokens_separator`, and after its second occurrence) stay in place, the
others are shuffled and each dropped with `caption_tag_dropout_rate`, and the tags are joined with ", ";
last, `secondary_separator` becomes `caption_separator`.
"""
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CAPTION_EXTENSIONS = (".txt", ".caption")  # each is read when the other is named but absent
WILDCARD = re.compile(r"\{([^}]+)\}")


def caption_candidates(image: Path, extension: str) -> list[Path]:
    """The caption files of `image` in the order they are tried: the named extension, then its stand-in."""
    extension = extension if extension.startswith(".") else "." + extension
    others = [e for e in CAPTION_EXTENSIONS if e != extension] if extension in CAPTION_EXTENSIONS else []
    return [image.with_suffix(e) for e in (extension, *others)]


def read_caption(path: Path, enable_wildcard: bool = False) -> tuple[str, int]:
    """(caption, number of non-empty lines) of a UTF-8 caption file: the first line stripped, as kohya reads it,
    or with `enable_wildcard` every non-empty line, joined by newlines. UnicodeDecodeError if not UTF-8."""
    lines = path.read_bytes().decode("utf-8").splitlines()
    filled = [line.strip() for line in lines if line.strip()]
    if enable_wildcard:
        return "\n".join(filled), len(filled)
    return (lines[0].strip() if lines else ""), len(filled)


@dataclass(frozen=True)
class CaptionOptions:
    """kohya's per-subset caption options (their names and defaults); calling it varies one caption for a step."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    enable_wildcard: bool = False
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be 0 or more, got {self.keep_tokens}")
        if not self.caption_separator:
            raise ValueError("caption_separator must not be empty")

    def __call__(self, caption: str, rng: np.random.Generator) -> str:
        if self.caption_prefix:
            caption = f"{self.caption_prefix} {caption}"
        if self.caption_suffix:
            caption = f"{caption} {self.caption_suffix}"
        if self.caption_dropout_rate > 0 and rng.random() < self.caption_dropout_rate:
            return ""
        if self.enable_wildcard:
            lines = caption.split("\n")
            caption = expand_wildcards(lines[int(rng.integers(len(lines)))], rng)
        else:
            caption = caption.split("\n")[0]
        if self.shuffle_caption or self.caption_tag_dropout_rate > 0:
            fixed, flexible, fixed_suffix = self.tags(caption)
            if self.shuffle_caption:
                flexible = [flexible[i] for i in rng.permutation(len(flexible))]
            if self.caption_tag_dropout_rate > 0:
                flexible = [t for t in flexible if rng.random() >= self.caption_tag_dropout_rate]
            caption = ", ".join(fixed + flexible + fixed_suffix)
        if self.secondary_separator:
            caption = caption.replace(self.secondary_separator, self.caption_separator)
        return caption

    def tags(self, caption: str) -> tuple[list[str], list[str], list[str]]:
        """(tags kept in front, tags to shuffle and drop, tags kept at the end) of a caption."""
        separator = self.keep_tokens_separator
        if separator and separator in caption:
            front, rest = caption.split(separator, 1)
            rest, back = rest.split(separator, 1) if separator in rest else (rest, "")
            return tuple([t.strip() for t in part.split(self.caption_separator) if t.strip()]
                         for part in (front, rest, back))
        tags = [t.strip() for t in caption.strip().split(self.caption_separator)]
        return tags[:self.keep_tokens], tags[self.keep_tokens:], []


def expand_wildcards(caption: str, rng: np.random.Generator) -> str:
    """Each `{a|b|c}` replaced by one of its choices; `{{` and `}}` stand for literal braces."""
    open_mark, close_mark = "\x00", "\x01"  # control characters no caption file holds
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = WILDCARD.sub(lambda m: (choices := m.group(1).split("|"))[int(rng.integers(len(choices)))], caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")
