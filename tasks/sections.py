"""The base of every config section, and the checks several sections share.

Each stage defines its own section beside the code that reads it (tasks/data_config.py,
models/config.py, tasks/optim_config.py, ...); pipelines/config.py composes them into the
root `TrainConfig`. Only pydantic and the standard library are imported here.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, field_validator, model_validator


class Section(BaseModel):
    # Unknown keys fail loudly; assignments are validated too (`--set` goes through them).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    SECTION: ClassVar[str] = ""  # the section's key in the root config
    CHOICE: ClassVar[str] = ""  # the key whose value decides which other keys apply (none: all apply)

    @field_validator("*")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        # Bounds catch NaN but not an infinity where there is no upper bound (weight_decay=.inf, kwargs).
        values = v.values() if isinstance(v, dict) else v if isinstance(v, list) else (v,)
        for x in values:
            for y in x if isinstance(x, list) else (x,):
                if isinstance(y, float) and not math.isfinite(y):
                    raise ValueError(f"expected a finite number, got {y}")
        return v

    @classmethod
    def uses(cls, choice: str) -> tuple[str, ...]:
        """The keys the choice `choice` (the value of CHOICE) reads besides CHOICE itself."""
        return tuple(k for k in cls.model_fields if k != cls.CHOICE)

    @model_validator(mode="after")
    def _applies(self) -> Section:
        """Refuse keys set away from their default that the choice made has no use for.

        A value left at its default is not a choice the user made (the UI form sends every key),
        so it passes; a preset's values for another choice are dropped by the loader
        (pipelines/config.py) when the user changes the choice.
        """
        if not self.CHOICE:
            return self
        choice = getattr(self, self.CHOICE)
        used = self.uses(choice)
        defaults = {
            key: field.get_default(call_default_factory=True)
            for key, field in type(self).model_fields.items()
            if key != self.CHOICE and key not in used
        }
        unused = [key for key, default in defaults.items() if getattr(self, key) != default]
        if unused:
            section = self.SECTION
            shown = ", ".join(f"{section}.{k}={getattr(self, k)!r}" for k in unused)
            uses = ", ".join(f"{section}.{k}" for k in used) or "no other keys"
            to_default = ", ".join(f"{k}={defaults[k]!r}" for k in unused)
            raise ValueError(
                f"{shown}: not used by {section}.{self.CHOICE}={choice} (it uses {uses}); remove it "
                f"(in a form: its default, {to_default}) or choose otherwise"
            )
        return self


def no_credentials(v: str, where: str, env_hint: str) -> str:
    """Secrets come from the environment, never from the config (it is logged, stored and shown in the UI)."""
    if "://" in v:
        parts = urlsplit(v)
        if parts.password or (parts.username and parts.scheme in ("http", "https", "s3")):
            raise ValueError(
                f"{where} must not hold credentials (user:password@); set {env_hint} in the environment instead"
            )
    return v


def column_names(v: Any) -> Any:
    """Column names given as YAML numbers (`--set data.target=1`, `features: [2019]`) mean those names."""

    def name(x: Any) -> Any:
        if isinstance(x, bool):  # YAML reads yes/no/on/off/true/false as booleans
            raise ValueError(
                f"got the boolean {x} (YAML reads yes/no/on/off/true/false so); "
                "quote a column named so, e.g. --set data.target='\"yes\"'"
            )
        return str(x) if isinstance(x, (int, float)) else x

    return [name(x) for x in v] if isinstance(v, list) else name(v)
