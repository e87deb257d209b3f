"""Base class shared by every config block (kept apart from config.py so strategies can import it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config block: unknown fields are errors, values are validated on assignment too."""

    # NaN or inf in a config is always a typo or a bug (lr=inf passes "gt=0"): reject them everywhere.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
