"""Target profiles: what each device needs and its accuracy-drift budget (``targets/*.toml``)."""

from edgeship.targets.profile import Target as Target
from edgeship.targets.profile import list_targets as list_targets
from edgeship.targets.profile import load_target as load_target

__all__ = ["Target", "list_targets", "load_target"]
