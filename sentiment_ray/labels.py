"""Label sets: normalisation, label-token ids for scoring, parsing generated text. Pure."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sentiment_ray.errors import UserError
from sentiment_ray.io.values import MISSING_LABEL, UNKNOWN_LABEL, as_key, value_problem


class LabelSetError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class LabelSet:
    labels: tuple[str, ...]

    def __init__(self, labels: Sequence[str]):
        cleaned = tuple(str(x).strip() for x in labels)
        if len(cleaned) < 2 or any(not x for x in cleaned):
            raise LabelSetError(f"a label set needs at least two non-empty labels, got {list(labels)}")
        if len({x.lower() for x in cleaned}) != len(cleaned):
            raise LabelSetError(f"labels must be distinct case-insensitively: {list(labels)}")
        object.__setattr__(self, "labels", cleaned)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return iter(self.labels)

    def index(self, label: str) -> int:
        return self.labels.index(label)

    def normalise(self, value: object) -> str | None:
        """Map a raw label ('positive', ' NEGATIVE ') to its canonical spelling; None if unknown."""
        if not isinstance(value, str):
            return None
        key = value.strip().lower()
        for label in self.labels:
            if label.lower() == key:
                return label
        return None

    def resolve(self, value: Any, label_map: dict[str, str] | None = None) -> tuple[str | None, str | None]:
        """(canonical label, None) or (None, the bad-row reason) for a raw gold label.
        `label_map` is applied first (keys compared as strings after stripping: IMDB's 0/1),
        then the label set matches case-insensitively."""
        problem = value_problem(value, "label")
        if problem:
            return None, problem
        key = as_key(value)
        if not key:
            return None, MISSING_LABEL
        label = self.normalise((label_map or {}).get(key, key))
        if label is None:
            mapping = f"; label_map keys: {sorted(label_map)}" if label_map else ""
            return None, f"{UNKNOWN_LABEL} ({key!r}; expected one of {', '.join(self.labels)}{mapping})"
        return label, None

    def probability_columns(self) -> list[str]:
        return [f"p_{label}" for label in self.labels]

    def first_token_ids(self, encode: Callable[[str], list[int]], prompt: str) -> list[int]:
        """The id of each label's first token *as it follows the prompt*.

        Tokenising the label alone can differ from how it tokenises after the prompt (a
        leading space or newline merges differently in BPE), so encode prompt + label and
        take the first token past the prompt's own tokens. Fails if two labels share that
        token: scoring could not tell them apart.
        """
        prompt_ids = encode(prompt)
        ids = []
        for label in self.labels:
            full = encode(prompt + label)
            if full[: len(prompt_ids)] != prompt_ids or len(full) <= len(prompt_ids):
                raise LabelSetError(
                    f"label {label!r} does not tokenise as a continuation of the prompt "
                    "(the prompt's last token merges with it); end the response header with "
                    "a newline or space"
                )
            ids.append(full[len(prompt_ids)])
        seen: dict[int, str] = {}
        for label, tid in zip(self.labels, ids):
            if tid in seen:
                raise LabelSetError(
                    f"labels {seen[tid]!r} and {label!r} share their first token (id {tid}); "
                    "label-token scoring cannot separate them: rename one label"
                )
            seen[tid] = label
        return ids

    def parse_generated(self, text: str) -> str | None:
        """The label a generated continuation starts with, or None.

        Matches case-insensitively at the start of the stripped text (longest label first,
        so 'Very Positive' beats 'Positive'). A truncated word ('Posit', cut by
        max_new_tokens) counts when it is at least 3 characters and prefixes exactly one
        label. Anything else is None: the caller counts it, never guesses.
        """
        answer = (text or "").strip().lower()
        if not answer:
            return None
        for label in sorted(self.labels, key=len, reverse=True):
            key = label.lower()
            if answer.startswith(key) and not answer[len(key) : len(key) + 1].isalnum():
                return label
        word = re.match(r"[^\W_]+", answer)
        if word and len(word.group(0)) >= 3 and word.group(0) == answer.split()[0]:
            hits = [label for label in self.labels if label.lower().startswith(word.group(0))]
            if len(hits) == 1 and len(answer) == len(word.group(0)):
                return hits[0]
        return None
