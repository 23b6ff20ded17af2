"""A classification head kept per device (FedPer-style personalisation, Arivazhagan et al. 2019).

With ``personal_head`` on, a device trains the global adapter together with its own head (the
global head the first time), keeps that head in its :class:`DeviceState`, and still uploads the
head's change against the global head. The coordinator's head therefore becomes the
example-weighted mean of the participants' personal heads: the starting point for new devices and
what central evaluation scores. Evaluation on the device reports both the global model and the
global adapter with the device's own head.

The file is named after the base model's sha256, which covers the label set and the initial head,
so a device moved to another model or label set starts a fresh head rather than loading one of the
wrong shape. A damaged file is set aside and the device starts again from the global head.
"""

from __future__ import annotations

import logging

from fleetlora.client.device_state import DeviceState
from fleetlora.common.delta import State, check_layout, load_trainable_state, trainable_state
from fleetlora.common.errors import IncompatibleStateError
from fleetlora.common.model import LoadedModel

log = logging.getLogger(__name__)

# PEFT wraps the task head (``classifier``, ``score``) in a ModulesToSaveWrapper whose trainable copy
# carries this name; LoRA matrices and selectively unfrozen base layers never do.
HEAD_MARKER = ".modules_to_save."


def head_of(state: State) -> State:
    return {name: tensor for name, tensor in state.items() if HEAD_MARKER in name}


def _file_name(loaded: LoadedModel) -> str:
    return f"personal-head-{loaded.base_sha256[:16]}"


def restore(loaded: LoadedModel, device: DeviceState) -> bool:
    """Swap this device's own head into the model; False if it has none yet (the global one stays)."""
    name = _file_name(loaded)
    try:
        stored = device.load_arrays(name)
        if stored is None:
            return False
        current = trainable_state(loaded.model)
        check_layout(stored, head_of(current))
    except IncompatibleStateError as exc:
        log.warning("Personal head unusable (%s); set aside at %s.", exc, device.set_aside(name))
        return False
    load_trainable_state(loaded.model, {**current, **stored})
    return True


def keep(loaded: LoadedModel, device: DeviceState) -> None:
    """Store the model's current head as this device's own."""
    device.save_arrays(_file_name(loaded), head_of(trainable_state(loaded.model)))
