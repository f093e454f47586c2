"""Progress display: medloupe shows its own (rich, in the CLI); the progress bars that
transformers and huggingface_hub print while loading weights are switched off."""

from __future__ import annotations


def silence_hub_progress() -> None:
    """Switch off transformers' and huggingface_hub's progress bars ("Loading weights ...").

    Call it right before loading a model; it imports only what is already needed to load one.
    """
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
