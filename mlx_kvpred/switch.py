"""An on/off choice for a speed-up: set in code, else off by its environment variable set to "0", else a default."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Union


@dataclass
class Switch:
    env_var: str
    default: Callable[[], bool]  # read at each check (e.g. the default device, a loaded BLAS)
    on_text: str  # what doctor prints when on
    off_text: str  # ... when off, followed by why
    default_off_reason: Union[str, Callable[[], str]]  # why `default` may say off (or a function that says why)
    _set: bool | None = None  # set(): True/False in code, None: env var and default

    def enabled(self) -> bool:
        if self._set is not None:
            return self._set
        return os.environ.get(self.env_var, "") != "0" and self.default()

    def set(self, enabled: bool | None) -> bool:
        """On (True), off (False) or the environment's and default's choice (None); returns the previous state."""
        was = self.enabled()
        self._set = enabled
        return was

    @contextmanager
    def off(self) -> Iterator[None]:
        """Off inside the block, as it was after."""
        was = self.set(False)
        try:
            yield
        finally:
            self.set(was)

    def note(self) -> str:
        """Whether it is on, and why it is off (doctor prints it)."""
        if self.enabled():
            return self.on_text
        if self._set is False:
            return f"{self.off_text} (switched off in code)"
        if os.environ.get(self.env_var, "") == "0":
            return f"{self.off_text} ({self.env_var}=0)"
        reason = self.default_off_reason
        return f"{self.off_text} ({reason() if callable(reason) else reason})"
