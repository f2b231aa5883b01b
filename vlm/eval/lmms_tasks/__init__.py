"""lmms-eval task definitions that read local files: pass this folder to `lmms-eval --include_path`.

No lmms-eval import here, so `python -c "import vlm.eval.lmms_tasks as t; print(t.TASKS_DIR)"`
works anywhere; the tasks' Python side is `vlm.eval.lmms_task`.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
