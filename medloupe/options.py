"""The options of one run: one model, one set of bounds, for the CLI, the Python API, the HTTP
API, LangGraph input and evaluation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medloupe.errors import InputError, validation_text

MAX_STEPS = 10
MAX_TIME_BUDGET_S = 3600.0


class RunOptions(BaseModel):
    """How one run goes. Unknown keys are refused (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int = Field(
        default=2, ge=1, le=MAX_STEPS, description="plan-act-rethink rounds at most"
    )
    time_budget_s: float = Field(
        default=300.0,
        gt=0,
        le=MAX_TIME_BUDGET_S,
        description="seconds after the start when no further round begins",
    )
    confidence_threshold: float = Field(
        default=0.8, ge=0.0, le=1.0, description="stop rethinking at this confidence"
    )
    review_plan: bool = Field(default=False, description="pause after planning for a reviewer")
    rethink: bool = Field(
        default=True, description="look again at cropped regions (False: an ablation)"
    )
    frame: int | None = Field(
        default=None, ge=0, description="DICOM frame / TIFF page / NIfTI volume"
    )
    slice_index: int | None = Field(default=None, ge=0, description="NIfTI slice index")
    axis: Literal[0, 1, 2] = Field(
        default=2, description="NIfTI axis cut across: 0 sagittal, 1 coronal, 2 axial"
    )
    modality: str | None = Field(
        default=None,
        pattern=r"^[A-Z]{2,4}$",
        description="DICOM modality code (CT, MR, CR, ...) when the file states none",
    )

    @field_validator("modality", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @classmethod
    def of(cls, options: RunOptions | dict[str, Any] | None) -> RunOptions:
        """``options`` as a :class:`RunOptions` (a dict is validated; ``None``: defaults).

        Raises:
            InputError: an unknown option or a value out of bounds (each named).
        """
        if isinstance(options, RunOptions):
            return options
        try:
            return cls.model_validate(options or {})
        except ValidationError as exc:
            raise InputError(f"bad run options: {validation_text(exc, root='options')}") from None

    def intake(self) -> dict[str, Any]:
        """The keyword arguments of :func:`medloupe.io.load_image` these options set."""
        return {
            "frame": self.frame,
            "slice_index": self.slice_index,
            "axis": self.axis,
            "modality": self.modality,
        }
