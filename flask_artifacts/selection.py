"""Choosing members: presets, include/exclude globs, latest and best checkpoints.

Patterns are matched, case-sensitively, against a member's path below the
archive's top folder (``model.safetensors``, ``checkpoint-20/optimizer.pt``):
``*`` and ``?`` do not cross ``/``, ``**/`` matches any number of folders
including none, and ``[...]`` is a character class. The preset applies
first, then the includes (when any), then the excludes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

from .errors import ArtifactsError

PRESETS = ("full", "weights")

#: Files ``?preset=weights`` keeps from the archive's top folder (no subfolders).
WEIGHTS_NAMES = frozenset({
    # configuration
    "config.json", "generation_config.json", "adapter_config.json",
    "preprocessor_config.json", "processor_config.json",
    # tokenizer
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    # shard indexes
    "model.safetensors.index.json", "pytorch_model.bin.index.json",
})
#: Weight files ``?preset=weights`` keeps: every shard, safetensors or PyTorch.
WEIGHTS_RE = re.compile(r"(model|pytorch_model|adapter_model)(-[0-9]+-of-[0-9]+)?\.(safetensors|bin)")

_EXTENSION_RE = re.compile(r"\.?([A-Za-z0-9]{1,12})")
MAX_PATTERNS = 32
MAX_PATTERN_LENGTH = 512


def in_preset(preset: str, rel: str) -> bool:
    if preset == "full":
        return True
    return "/" not in rel and (rel in WEIGHTS_NAMES or WEIGHTS_RE.fullmatch(rel) is not None)


@functools.lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob into an anchored regular expression."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and _class_end(pattern, i) != -1:
            end = _class_end(pattern, i)
            body = pattern[i + 1:end]
            negate = body.startswith("!")
            body = re.sub(r"([\\^\[])", r"\\\1", body[1:] if negate else body)
            out.append(("[^/" if negate else "(?!/)[") + body + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out))


def _class_end(pattern: str, start: int) -> int:
    """Index of the ``]`` closing the class opened at ``start``, or -1."""
    j = start + 1
    if pattern[j:j + 1] == "!":
        j += 1
    if pattern[j:j + 1] == "]":
        j += 1
    return pattern.find("]", j)


@dataclasses.dataclass(frozen=True)
class Selection:
    preset: str = "full"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    sha256sums: bool = False

    @property
    def narrowed(self) -> bool:
        return self.preset != "full" or bool(self.include or self.exclude)

    def as_params(self) -> dict[str, object]:
        """The query parameters that ask for this selection again."""
        params: dict[str, object] = {}
        if self.preset != "full":
            params["preset"] = self.preset
        if self.include:
            params["include"] = list(self.include)
        if self.exclude:
            params["exclude"] = list(self.exclude)
        if self.sha256sums:
            params["sha256sums"] = "1"
        return params

    def apply(self, rels: Sequence[str]) -> list[bool]:
        """Which of ``rels`` (paths below the top folder) are selected.

        Raises ``invalid_pattern`` for an include that matches nothing and
        looks like a bare extension, and ``nothing_selected`` when nothing is
        left, so no one receives an empty archive.
        """
        chosen = [in_preset(self.preset, rel) for rel in rels]
        if self.include:
            regexes = [glob_regex(p) for p in self.include]
            for pattern, regex in zip(self.include, regexes):
                if not any(regex.fullmatch(rel) for rel in rels):
                    _complain_if_extension(pattern, rels)
            chosen = [c and any(r.fullmatch(rel) for r in regexes) for c, rel in zip(chosen, rels)]
        if self.exclude:
            regexes = [glob_regex(p) for p in self.exclude]
            for pattern, regex in zip(self.exclude, regexes):
                if not any(regex.fullmatch(rel) for rel in rels):
                    _complain_if_extension(pattern, rels)
            chosen = [c and not any(r.fullmatch(rel) for r in regexes) for c, rel in zip(chosen, rels)]
        if rels and not any(chosen):
            shown = list(rels[:200])
            raise ArtifactsError(
                "Nothing in this download matches the selection"
                f" (preset={self.preset!r}, include={list(self.include)},"
                f" exclude={list(self.exclude)}). 'available' lists what exists;"
                " patterns match paths below the archive's top folder.",
                code="nothing_selected", status=404, available=shown,
                available_total=len(rels))
        return chosen


def _complain_if_extension(pattern: str, rels: Sequence[str]) -> None:
    if any(c in pattern for c in "*?[") or "/" in pattern:
        return
    match = _EXTENSION_RE.fullmatch(pattern)
    if match is None:
        return
    ext = "." + match.group(1)
    if pattern.startswith(".") or any(rel.endswith(ext) for rel in rels):
        raise ArtifactsError(
            f"The pattern {pattern!r} matches whole paths, so it matches nothing here."
            f" To select every {ext} file, use '**/*{ext}'.",
            code="invalid_pattern", status=400, pattern=pattern, suggestion=f"**/*{ext}")


def parse_selection(args, sha256sums_default: bool = False) -> Selection:  # type: ignore[no-untyped-def]
    """Read ``preset``, ``include``, ``exclude`` and ``sha256sums`` from query args."""
    preset = args.get("preset", "full")
    if preset not in PRESETS:
        raise ArtifactsError(
            f"'preset' must be one of {', '.join(PRESETS)}, not {preset!r}.",
            code="invalid_parameter", status=400)
    include = tuple(args.getlist("include"))
    exclude = tuple(args.getlist("exclude"))
    for pattern in include + exclude:
        if not pattern or len(pattern) > MAX_PATTERN_LENGTH or "\0" in pattern:
            raise ArtifactsError(
                f"Patterns must be 1 to {MAX_PATTERN_LENGTH} characters without NUL.",
                code="invalid_pattern", status=400, pattern=pattern[:100])
    if len(include) + len(exclude) > MAX_PATTERNS:
        raise ArtifactsError(f"At most {MAX_PATTERNS} patterns per request.",
                             code="invalid_pattern", status=400)
    flag = args.get("sha256sums")
    sha256sums = sha256sums_default if flag is None else flag.lower() in ("1", "true", "yes", "on")
    return Selection(preset, include, exclude, sha256sums)
