"""The embedded synthetic world: seeded images of coloured shapes with questions, answers and captions.

Small enough to train a tiny VLM on a CPU in minutes, and exact enough to test one: every answer is computed from
the scene's coordinates. ``scenes`` samples and renders, ``tasks`` writes questions/answers/captions,
``extra_tasks`` adds the opt-in high-resolution, video and multi-image tasks, ``generate`` writes the splits to disk.
"""

from vlmlab.data.world.extra_tasks import EXTRA_TASKS
from vlmlab.data.world.generate import build_world
from vlmlab.data.world.preferences import write_preferences
from vlmlab.data.world.tasks import TASKS

__all__ = ["EXTRA_TASKS", "TASKS", "build_world", "write_preferences"]
